"""Hadamard matrices: +-1 entries, H H^T = n I for every order built; randomised ones are
orthogonal; sizes without a Hadamard fall back to a random orthogonal matrix."""

from __future__ import annotations

import pytest
import torch

from pvtune.rotation.hadamard import (
    hadamard,
    hadamard_factor,
    random_hadamard,
    random_orthogonal,
    rotation_matrix,
)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 60, 64, 72, 76, 576, 1536])
def test_hadamard_is_hadamard(n):
    h = hadamard(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))


def test_the_default_models_sizes_factor_as_expected():
    assert hadamard_factor(576) == 36 and hadamard_factor(1536) == 12
    assert hadamard_factor(64) == 1
    assert hadamard_factor(52) is None and hadamard(40).shape == (40, 40)
    with pytest.raises(ValueError, match="no Hadamard matrix of order 52"):
        hadamard(52)


@pytest.mark.parametrize("n", [36, 48, 52, 576])
def test_rotations_are_orthogonal(n):
    gen = torch.Generator().manual_seed(0)
    q, what = rotation_matrix(n, "hadamard", gen)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=q.dtype))
    assert what == ("orthogonal" if n == 52 else f"hadamard {hadamard_factor(n)}x"
                    f"{n // hadamard_factor(n)}")
    r = random_orthogonal(n, gen)
    torch.testing.assert_close(r.T @ r, torch.eye(n, dtype=r.dtype))
    a, b = random_hadamard(n if n != 52 else 48, torch.Generator().manual_seed(1)), \
        random_hadamard(n if n != 52 else 48, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)  # the signs are random
    with pytest.raises(ValueError, match="unknown rotation kind"):
        rotation_matrix(n, "givens", gen)
