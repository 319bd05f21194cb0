"""The lookup-table kernel for AQLM 8-bit codes equals dequantize-then-matmul."""

from __future__ import annotations

import pytest
import torch

from pvtune import AQLMConfig, QuantizedLinear
from pvtune.kernels.lut import additive_lut_matmul, lut_available
from pvtune.nn.quantized_linear import LUT_MAX_TOKENS
from pvtune.reprs import AdditiveWeight

pytestmark = pytest.mark.skipif(not lut_available(), reason="numba is not installed")


def random_rep(out_f, in_f, books, g, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rep = AdditiveWeight(out_f, in_f, AQLMConfig(num_codebooks=books, nbits_per_codebook=8,
                                                 in_group_size=g, kmeans_iters=1))
    with torch.no_grad():
        rep.codes.copy_(torch.randint(0, 256, rep.codes.shape, generator=gen))
        rep.codebooks.copy_(torch.randn(rep.codebooks.shape, generator=gen))
        rep.scales.copy_(torch.rand(rep.scales.shape, generator=gen) + 0.5)
    return rep


@pytest.mark.parametrize(("out_f", "in_f", "books", "g"), [
    (37, 64, 1, 8), (13, 160, 2, 8), (64, 48, 3, 4), (17, 256, 2, 16), (96, 72, 2, 8),
])
@pytest.mark.parametrize("tokens", range(1, 10))
def test_lut_equals_dequantize_then_matmul(out_f, in_f, books, g, tokens):
    rep = random_rep(out_f, in_f, books, g, seed=out_f + tokens)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens))
    ref = x @ rep().detach().T
    got = additive_lut_matmul(x, rep.codes, rep.codebooks, rep.scales)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_leading_dims_kept():
    rep = random_rep(64, 32, 2, 8)
    x = torch.randn(2, 3, 32)
    assert additive_lut_matmul(x, rep.codes, rep.codebooks, rep.scales).shape == (2, 3, 64)


def test_linear_chooses_the_kernel_for_few_tokens_only(monkeypatch):
    rep = random_rep(64, 32, 2, 8)
    layer = QuantizedLinear(rep, torch.randn(64))
    calls = []
    real = rep.lut_matmul
    monkeypatch.setattr(rep, "lut_matmul", lambda x: calls.append(x.shape) or real(x))
    with torch.no_grad():
        few = torch.randn(1, LUT_MAX_TOKENS, 32)
        torch.testing.assert_close(layer(few), few @ rep().T + layer.bias, rtol=1e-5,
                                   atol=1e-5)
        many = torch.randn(1, LUT_MAX_TOKENS + 1, 32)
        torch.testing.assert_close(layer(many), many @ rep().T + layer.bias)
    assert calls == [few.shape]  # one kernel call: the long input was decoded instead
    x = torch.randn(2, 32, requires_grad=True)
    layer(x).sum().backward()  # training: always the differentiable dense path
    assert len(calls) == 1 and x.grad is not None
