"""Hadamard and random orthogonal matrices for incoherence processing.

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H H^T = n I``. Sylvester's
doubling gives every power of two; Paley's constructions give ``q + 1`` for a prime
``q = 3 (mod 4)`` (orders 4, 8, 12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...) and
``2 (q + 1)`` for a prime ``q = 1 (mod 4)`` (12, 28, 36, 60, 76, 108, ...); Kronecker products
join them, so ``K x 2^m`` is covered for every such ``K`` (SmolLM2: hidden 576 = 36 x 16,
intermediate 1536 = 12 x 128, head 64). :func:`random_hadamard` scales to an orthogonal
matrix and flips the sign of random columns, as QuaRot and SpinQuant do; where no order
divides the size into a power of two, :func:`rotation_matrix` falls back to a random
orthogonal matrix (QR of a Gaussian), and says which it made.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _legendre(q: int) -> list[int]:
    """The quadratic character mod prime ``q``: chi(0) = 0, +1 on squares, -1 elsewhere."""
    squares = {(x * x) % q for x in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal(q: int) -> Tensor:
    chi = _legendre(q)
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)],
                        dtype=torch.float64)


def _paley1(q: int) -> Tensor:
    """Order ``q + 1`` for a prime ``q = 3 (mod 4)``."""
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> Tensor:
    """Order ``2 (q + 1)`` for a prime ``q = 1 (mod 4)``."""
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    minus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    out = torch.zeros(2 * n, 2 * n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            block = minus if c[i, j] == 0 else plus * c[i, j]
            out[2 * i : 2 * i + 2, 2 * j : 2 * j + 2] = block
    return out


@lru_cache(maxsize=64)
def _base(order: int) -> Tensor | None:
    """A Hadamard matrix of ``order`` from Paley's constructions (None if neither applies)."""
    if order == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if order == 2:
        return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    q = order - 1
    if _is_prime(q) and q % 4 == 3:
        return _paley1(q)
    if order % 2 == 0:
        q = order // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            return _paley2(q)
    return None


def hadamard_factor(n: int) -> int | None:
    """The smallest ``K`` with ``n = K * 2^m`` for which a Hadamard matrix of order ``K`` is
    built here (None if there is none)."""
    for m in range(n.bit_length(), -1, -1):
        if n % (1 << m) == 0 and _base(n >> m) is not None:
            return n >> m
    return None


def hadamard(n: int) -> Tensor:
    """A Hadamard matrix of order ``n`` (entries +-1, float64); a ``ValueError`` when ``n`` is
    not ``K * 2^m`` for a ``K`` built here."""
    k = hadamard_factor(n)
    if k is None:
        raise ValueError(f"no Hadamard matrix of order {n} is built here (orders K x 2^m with "
                         "K from Paley's constructions)")
    out = _base(k)
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while out.shape[0] < n:
        out = torch.kron(sylvester, out)
    return out


def random_hadamard(n: int, generator: torch.Generator) -> Tensor:
    """``H D / sqrt(n)``: an orthogonal Hadamard matrix with random column signs ``D``."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1
    return hadamard(n) * signs / n**0.5


def random_orthogonal(n: int, generator: torch.Generator) -> Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))


def rotation_matrix(n: int, kind: str, generator: torch.Generator) -> tuple[Tensor, str]:
    """An ``n x n`` orthogonal matrix of ``kind`` (``hadamard``: randomised Hadamard where the
    size allows, else random orthogonal; ``orthogonal``: random orthogonal) and a description
    of what was made (``hadamard 36x16``, ``orthogonal``)."""
    if kind == "hadamard":
        k = hadamard_factor(n)
        if k is not None:
            what = f"hadamard {n}" if k == 1 else f"hadamard {k}x{n // k}"
            return random_hadamard(n, generator), what
    elif kind != "orthogonal":
        raise ValueError(f"unknown rotation kind {kind!r}; known: hadamard, orthogonal")
    return random_orthogonal(n, generator), "orthogonal"
