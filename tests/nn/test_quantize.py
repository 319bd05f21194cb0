from __future__ import annotations

import pytest
import torch
from torch import nn

from pvtune import (
    AQLMConfig,
    BinaryConfig,
    QuantizedLinear,
    UniformConfig,
    dequantize_,
    linear_bits_per_param,
    quantize_,
)
from pvtune.nn import quantized_layers


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16, bias=False),
                         nn.Sequential(nn.Linear(16, 32)))


def test_quantize_swaps_every_linear_and_keeps_bias():
    model = tiny_mlp()
    bias = model[0].bias.detach().clone()
    quantize_(model, UniformConfig(bits=4, group_size=16))
    layers = quantized_layers(model)
    assert set(layers) == {"0", "2", "3.0"}
    assert torch.equal(model[0].bias, bias)
    assert model[2].bias is None
    assert model(torch.randn(5, 32)).shape == (5, 32)


def test_filter_fn_selects_layers():
    model = tiny_mlp()
    quantize_(model, BinaryConfig(), filter_fn=lambda m, name: name != "0")
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], QuantizedLinear)


def test_quantized_output_equals_decoded_dense_linear():
    model = tiny_mlp()
    quantize_(model, UniformConfig(bits=3, group_size=16))
    x = torch.randn(7, 32)
    y = model(x)
    dequantize_(model)
    assert not quantized_layers(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)


def test_8bit_is_close_to_dense():
    model = tiny_mlp()
    x = torch.randn(7, 32)
    ref = model(x)
    quantize_(model, UniformConfig(bits=8, group_size=16))
    assert (model(x) - ref).abs().max() < 0.02 * ref.abs().max()


def test_gradients_reach_continuous_params():
    model = tiny_mlp()
    quantize_(model, AQLMConfig(num_codebooks=1, nbits_per_codebook=4, in_group_size=4,
                                kmeans_iters=2))
    model(torch.randn(3, 32)).sum().backward()
    q = model[0].qweight
    assert q.codebooks.grad is not None and q.codebooks.grad.abs().sum() > 0
    assert q.scales.grad is not None and model[0].bias.grad is not None


def test_weight_property_and_bits():
    model = tiny_mlp()
    quantize_(model, UniformConfig(bits=2, group_size=16))
    assert model[0].weight.shape == (64, 32)
    assert linear_bits_per_param(model) == pytest.approx(2 + 18 / 16)


def test_incompatible_layer_error_names_it():
    model = tiny_mlp()
    with pytest.raises(ValueError, match=r"cannot quantize layer '0' \(64x32\).*group_size=24"):
        quantize_(model, UniformConfig(group_size=24))


def test_rejects_non_config():
    with pytest.raises(TypeError, match="representation config"):
        quantize_(tiny_mlp(), {"bits": 4})


def test_quantize_is_all_or_nothing():
    """A layer that fails to compress leaves every layer as it was (none half-replaced)."""
    from pvtune import AQLMConfig

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))  # 4x64: too few groups
    config = AQLMConfig(num_codebooks=1, nbits_per_codebook=8, in_group_size=8)
    with pytest.raises(ValueError, match=r"cannot quantize layer '1' \(4x64\).*256 codewords"):
        quantize_(model, config)
    assert not quantized_layers(model)
    assert all(type(m) is nn.Linear for m in model)


def test_a_bare_linear_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"QuantizedLinear.from_linear"):
        quantize_(nn.Linear(16, 16), UniformConfig(group_size=16))
    layer = QuantizedLinear.from_linear(nn.Linear(16, 16), UniformConfig(group_size=16))
    assert layer.weight.shape == (16, 16)
