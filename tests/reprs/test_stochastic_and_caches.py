"""Stochastic rounding is unbiased for every representation with an exact rule, and the
decode caches keyed by tensor versions notice an in-place change."""

from __future__ import annotations

import pytest
import torch

from pvtune import AQLMConfig, BinaryConfig, TernaryConfig, UniformConfig
from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.reprs import GGUFBlockConfig
from pvtune.reprs.base import representation_for

# the representations whose stochastic_encode rounds between neighbouring levels exactly
SCALAR_GRIDS = [UniformConfig(bits=2, group_size=8), BinaryConfig(group_size=8),
                TernaryConfig(group_size=8), GGUFBlockConfig("q2_0"), GGUFBlockConfig("q4_0"),
                GGUFBlockConfig("q4_1")]


@pytest.mark.parametrize("config", SCALAR_GRIDS, ids=lambda c: getattr(c, "block_type",
                                                                      c.type_name))
def test_stochastic_encode_is_unbiased(config):
    """Over many draws, the mean decoded weight equals a target strictly inside the grid
    (to a few standard errors), while nearest rounding is biased on the same target."""
    torch.manual_seed(0)
    width = 64
    dense = torch.randn(4, width)
    rep = representation_for(config).from_dense(dense, config)
    grid = rep().detach()
    # targets between levels and inside every group's range (each group spans 0): the
    # decoded weights shrunk towards 0
    target = 0.7 * grid
    lo, hi = grid.min(-1, keepdim=True).values, grid.max(-1, keepdim=True).values
    draws = 2000
    total = torch.zeros_like(target)
    gen = torch.Generator().manual_seed(1)
    for _ in range(draws):
        rep.stochastic_encode(target, generator=gen)
        total += rep().detach()
    mean = total / draws
    spacing = (hi - lo).max()
    # each draw's error is at most one level spacing: the mean's standard error <= s/sqrt(n)
    assert (mean - target).abs().max() < 5 * spacing / draws ** 0.5
    rep.encode(target)
    assert (rep().detach() - target).abs().mean() > (mean - target).abs().mean()


@pytest.mark.parametrize("config", [UniformConfig(bits=2, group_size=8),
                                    AQLMConfig(num_codebooks=1, nbits_per_codebook=8,
                                               in_group_size=8, kmeans_iters=2)],
                         ids=["uniform", "aqlm-lut"])
def test_decode_caches_see_in_place_changes(config):
    """Under no_grad a layer reuses its decoded weight (and AQLM its lookup-table layout)
    until a code or parameter changes in place; then the output follows the new weight."""
    torch.manual_seed(0)
    layer = QuantizedLinear.from_linear(torch.nn.Linear(64, 64, bias=False), config)
    x = torch.randn(2, 64)  # two tokens: AQLM 8-bit decodes through its kernel
    with torch.no_grad():
        first = layer(x)
        assert torch.equal(layer(x), first)  # cached
        codes = layer.qweight.codes
        codes.copy_(torch.roll(codes, 1, dims=0))  # in place: the version counter moves
        moved = layer(x)
        assert not torch.allclose(moved, first)
        torch.testing.assert_close(moved, x @ layer.qweight().T, rtol=1e-4, atol=1e-5)
        param = next(layer.qweight.parameters())
        param.mul_(2.0)
        torch.testing.assert_close(layer(x), x @ layer.qweight().T, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(layer(x), moved)
