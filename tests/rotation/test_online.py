"""Online rotations are orthogonal, keep a reading layer's output when folded into it, and
refuse sizes without a Hadamard matrix."""

from __future__ import annotations

import pytest
import torch

from pvtune.errors import ConfigError
from pvtune.rotation.online import OnlineRotation


@pytest.mark.parametrize("size", [8, 12, 64, 96, 1536])
def test_the_rotation_is_orthogonal_and_matches_its_matrix(size):
    rot = OnlineRotation(size, torch.Generator().manual_seed(size))
    r = rot.matrix(torch.float64)
    torch.testing.assert_close(r @ r.T, torch.eye(size, dtype=torch.float64))
    x = torch.randn(3, 5, size, dtype=torch.float64)
    torch.testing.assert_close(rot(x), x @ r)
    assert set(rot.signs.tolist()) <= {-1.0, 1.0}


def test_folding_into_the_reader_keeps_its_output():
    rot = OnlineRotation(24, torch.Generator().manual_seed(1))
    w = torch.randn(7, 24, dtype=torch.float64)
    x = torch.randn(4, 24, dtype=torch.float64)
    torch.testing.assert_close(rot(x) @ rot.fold_into_reader(w).T, x @ w.T)


def test_a_size_without_a_hadamard_matrix_is_refused():
    with pytest.raises(ConfigError, match="Hadamard"):
        OnlineRotation(7 * 9)
