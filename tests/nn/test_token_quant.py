"""Per-token quantization matches its formula on hand-made tensors: per-row scales from the
clipped range, an asymmetric zero point, the straight-through gradient; the input quantizer
records round-trip through a checkpoint's layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pvtune.errors import CheckpointError, ConfigError
from pvtune.nn.input_quantizers import input_quantizer_from_spec, input_quantizer_spec
from pvtune.nn.token_quant import TokenQuantConfig, TokenQuantizer, quantize_tokens
from pvtune.qat import ActivationQuantConfig, ActivationQuantizer
from pvtune.rotation.online import OnlineRotation


def test_a_hand_made_row_lands_on_its_asymmetric_grid():
    # range [-1, 3] at 2 bits: scale 4/3, zero round(0.75) = 1, levels -4/3, 0, 4/3, 8/3
    x = torch.tensor([[-1.0, 0.0, 0.5, 1.0, 3.0]])
    s = 4 / 3
    expected = torch.tensor([[-s, 0.0, 0.0, s, 2 * s]])
    torch.testing.assert_close(quantize_tokens(x, 2), expected)


def test_clipping_shrinks_the_range_and_saturates_the_extremes():
    x = torch.tensor([[-2.0, 0.0, 4.0]])
    # clip 0.5: range [-1, 2], 3 bits: scale 3/7, zero round(7/3) = 2
    out = quantize_tokens(x, 3, clip=0.5)
    scale = 3 / 7
    assert out[0, 2] == pytest.approx(5 * scale)  # 4.0 saturates at code 7 -> (7 - 2) s
    assert out[0, 0] == pytest.approx(-2 * scale)  # -2.0 saturates at code 0
    assert out[0, 1] == 0.0


def test_each_row_has_its_own_scale():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 100.0, 200.0, 300.0]])
    out = quantize_tokens(x, 2)  # 4 levels: each row is exactly on its grid
    torch.testing.assert_close(out, x)


def test_a_constant_zero_row_stays_zero_and_finite():
    out = quantize_tokens(torch.zeros(2, 5), 4)
    assert torch.equal(out, torch.zeros(2, 5))


def test_the_gradient_passes_straight_through():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(3, 8)
    (quantize_tokens(x, 2, clip=0.5) * w).sum().backward()
    torch.testing.assert_close(x.grad, w)  # no clipping mask, even for saturated values


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), clip=st.floats(0.3, 1.0), seed=st.integers(0, 10_000))
def test_the_error_is_at_most_half_a_step_inside_the_clipped_range(bits, clip, seed):
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
    hi = x.amax(-1, keepdim=True).clamp(min=0) * clip
    lo = x.amin(-1, keepdim=True).clamp(max=0) * clip
    step = (hi - lo) / (2**bits - 1)
    err = (quantize_tokens(x, bits, clip) - x).abs()
    inside = (x >= lo) & (x <= hi)
    # rounding costs half a step; the rounded zero point shifts the grid by at most half a
    # step more at the saturated ends
    assert torch.all(err[inside] <= step.expand_as(x)[inside] + 1e-6)
    for row in quantize_tokens(x, bits, clip):  # exactly on a grid of 2^bits levels
        assert len(torch.unique(row)) <= 2**bits


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="bits"):
        TokenQuantConfig(bits=1)
    with pytest.raises(ConfigError, match="clip"):
        TokenQuantConfig(clip=0.0)


def test_sixteen_bits_is_the_identity_and_a_rotation_still_applies():
    rot = OnlineRotation(8, torch.Generator().manual_seed(0))
    x = torch.randn(2, 8)
    torch.testing.assert_close(TokenQuantizer(TokenQuantConfig(16))(x), x)
    torch.testing.assert_close(TokenQuantizer(TokenQuantConfig(16), rot)(x),
                               x @ rot.matrix())


def test_quantizer_records_round_trip_and_bad_ones_are_refused():
    rot = OnlineRotation(12, torch.Generator().manual_seed(0))
    q = TokenQuantizer(TokenQuantConfig(8, 0.9), rot)
    spec = input_quantizer_spec(q)
    assert spec == {"kind": "per_token", "bits": 8, "clip": 0.9, "rotation": {"size": 12}}
    back = input_quantizer_from_spec(spec)
    assert isinstance(back, TokenQuantizer) and back.config == q.config
    assert back.rotation.size == 12
    # the original sign/LSQ records carry no kind and still load
    lsq = ActivationQuantizer(ActivationQuantConfig(bits=4, estimator="lsq"))
    assert "kind" not in input_quantizer_spec(lsq)
    assert isinstance(input_quantizer_from_spec(input_quantizer_spec(lsq)), ActivationQuantizer)
    with pytest.raises(CheckpointError, match="input quantizer kind"):
        input_quantizer_from_spec({"kind": "nonsense"})
    with pytest.raises(CheckpointError, match="per-token"):
        input_quantizer_from_spec({"kind": "per_token", "bits": 1, "clip": 1.0})
    with pytest.raises(CheckpointError, match="register"):
        input_quantizer_spec(torch.nn.ReLU())
