"""Rotations applied to activations while the model runs (SpinQuant's R3 and R4).

A rotation that cannot be folded into a neighbouring weight on both sides (queries and keys
after RoPE; the input of the down projection, after the gated product) runs online: the
activation is multiplied by ``R = H D / sqrt(n)`` (a Hadamard matrix ``H`` of order ``n``
with random column signs ``D``), and where a weight reads it, that weight is multiplied by
``R`` once, offline, so the product is unchanged. :class:`OnlineRotation` keeps only the
signs (``n`` values, saved with the model); ``H`` is rebuilt from its order.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.rotation.hadamard import hadamard, hadamard_factor


@lru_cache(maxsize=16)
def _hadamard_cached(n: int, dtype: torch.dtype, device: str) -> Tensor:
    return (hadamard(n) / n**0.5).to(dtype=dtype, device=device)


class OnlineRotation(nn.Module):
    """``x -> x R`` over the last dimension of size ``size``, ``R = H diag(signs) / sqrt(n)``
    orthogonal. Signs come from ``generator`` (or are loaded from a checkpoint)."""

    def __init__(self, size: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if hadamard_factor(size) is None:
            raise ConfigError(f"no Hadamard matrix of order {size} is built here: an online "
                              "rotation needs a size K x 2^m with K from Paley's constructions "
                              "(turn this rotation off for this model)")
        self.size = size
        signs = (torch.ones(size) if generator is None else
                 torch.randint(0, 2, (size,), generator=generator).float() * 2 - 1)
        self.register_buffer("signs", signs)

    def matrix(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``R`` as a dense ``[size, size]`` matrix."""
        h = _hadamard_cached(self.size, torch.float64, str(self.signs.device))
        return (h * self.signs.to(torch.float64)).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        h = _hadamard_cached(self.size, x.dtype, str(x.device))
        return (x @ h) * self.signs.to(x.dtype)

    def fold_into_reader(self, weight: Tensor) -> Tensor:
        """The weight ``W R`` of a linear that reads the rotated activation, so that
        ``(x R)(W R)^T = x W^T`` (computed in float64)."""
        return (weight.to(torch.float64) @ self.matrix(torch.float64)).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}"
