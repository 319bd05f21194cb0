"""Activation and KV-cache quantization behind rotations: with nothing quantized every
rotation (R1-R4, online ones included) keeps the model's logits on every family; the
adaptive choice follows its measurements and rotates a layer with an outlier channel; a
prepared model saves and reloads bit for bit, with compressed or full-precision weights."""

from __future__ import annotations

import copy

import pytest
import torch

from pvtune.errors import ConfigError
from pvtune.llm.activation_quant import (
    ActivationKVConfig,
    RotationChoice,
    down_projections,
    prepare_activation_quant_,
    select_rotations,
)
from pvtune.llm.checkpoint import load_compressed, save_compressed
from pvtune.llm.kv_quant import KVQuantizer
from pvtune.nn import QuantizedLinear, quantize_
from pvtune.nn.token_quant import TokenQuantConfig, TokenQuantizer
from pvtune.reprs import UniformConfig
from tests.llm.conftest import ARCHITECTURES, build_model, build_tokenizer

OFF = TokenQuantConfig(16)


def tiny(kind: str, **overrides):
    extra = {"head_dim": 8} if "head_dim" in ARCHITECTURES[kind][2] else {}
    model = build_model(kind, 300, hidden_size=48, intermediate_size=96,
                        **{**extra, **overrides}).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm scales far from 1, so folding them matters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


def ids(n: int = 2, length: int = 16, seed: int = 3):
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_every_rotation_with_nothing_quantized_keeps_the_logits(kind):
    model = tiny(kind)
    original = copy.deepcopy(model)
    choice = prepare_activation_quant_(model, ActivationKVConfig(OFF, OFF, rotations="on"))
    assert all(choice.down) and all(choice.queries_keys)  # the online rotations are there
    assert choice.residual == (kind not in {"gemma2", "gemma3"})  # refused: residual norms
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, original(ids()).logits,
                                   atol=2e-5, rtol=1e-4)
    downs = [model.get_submodule(n) for n in down_projections(model)]
    assert all(d.input_quantizer.rotation is not None for d in downs)
    assert sum(isinstance(m, KVQuantizer) for m in model.modules()) == 2


def test_quantized_activations_change_the_logits_and_rotations_help_with_an_outlier():
    model = tiny("llama")
    with torch.no_grad():  # one intermediate channel of block 0 far larger than the rest
        model.model.layers[0].mlp.up_proj.weight[5] *= 60.0
    original = copy.deepcopy(model)
    choice = select_rotations(model, ActivationKVConfig(), ids(8))
    for i in range(2):  # the choice is what the measurements say
        off, on = choice.errors["off"][i], choice.errors["on"][i]
        assert choice.down[i] == (on["down"] < off["down"])
        assert choice.heads[i] == (on["heads"] < off["heads"])
        assert choice.queries_keys[i] == (on["keys"] < off["keys"])
    assert choice.down[0]
    assert choice.errors["on"][0]["down"] < 0.5 * choice.errors["off"][0]["down"]
    prepare_activation_quant_(model, ActivationKVConfig(), choice=choice)
    with torch.no_grad():
        assert (model(ids()).logits - original(ids()).logits).abs().max() > 1e-3
    assert isinstance(model.model.layers[0].mlp.down_proj.input_quantizer, TokenQuantizer)


def test_the_adaptive_mode_needs_samples_and_a_choice_must_fit():
    with pytest.raises(ConfigError, match="samples"):
        prepare_activation_quant_(tiny("llama"), ActivationKVConfig())
    with pytest.raises(ConfigError, match="blocks"):
        prepare_activation_quant_(tiny("llama"), ActivationKVConfig(),
                                  choice=RotationChoice.uniform(3, True))
    with pytest.raises(ConfigError, match="rotations"):
        ActivationKVConfig(rotations="sometimes")
    model = tiny("llama")
    prepare_activation_quant_(model, ActivationKVConfig(rotations="off"))
    with pytest.raises(ConfigError, match="already"):
        prepare_activation_quant_(model, ActivationKVConfig(rotations="off"))


@pytest.mark.parametrize("compressed", [True, False])
def test_a_prepared_model_saves_and_reloads_bit_for_bit(tmp_path, compressed):
    tokenizer = build_tokenizer(tmp_path / "tok")
    model = tiny("qwen2")
    choice = prepare_activation_quant_(model, ActivationKVConfig(rotations="adaptive"),
                                       samples=ids(4))
    if compressed:  # weights per output channel at 4 bits; the input quantizers stay
        quantize_(model, UniformConfig(bits=4, group_size=None),
                  filter_fn=lambda m, n: ".layers." in n)
        downs = [model.get_submodule(n) for n in down_projections(model)]
        assert all(isinstance(d, QuantizedLinear) for d in downs)
        assert all(isinstance(d.input_quantizer, TokenQuantizer) for d in downs)
    save_compressed(model, tokenizer, tmp_path / "ckpt", meta={"rotations": choice.to_dict()})
    loaded, _ = load_compressed(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids()).logits, model(ids()).logits)
    assert sum(isinstance(m, KVQuantizer) for m in loaded.modules()) == 2
    flags = [m.rotation is not None for m in loaded.modules() if isinstance(m, KVQuantizer)]
    assert flags == choice.queries_keys


def test_calibration_sees_the_inputs_the_weights_multiply():
    from pvtune.llm.activations import XTXCollector

    model = tiny("llama")
    prepare_activation_quant_(model, ActivationKVConfig(TokenQuantConfig(16), OFF,
                                                        rotations="on"))
    block = model.model.layers[0]
    down = block.mlp.down_proj
    seen = []
    handle = down.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].detach()))
    collector = XTXCollector(block)
    with torch.no_grad():
        model(ids())
    collector.remove()
    handle.remove()
    x = down.input_quantizer.rotation(seen[0]).reshape(-1, down.in_features).float()
    torch.testing.assert_close(collector.xtx("mlp.down_proj"), x.T @ x / x.shape[0])


def test_a_block_keeps_its_rotation_whatever_the_other_blocks_choose():
    def signs(choice):
        model = tiny("llama")
        prepare_activation_quant_(model, ActivationKVConfig(rotations="adaptive"),
                                  choice=choice)
        down = model.model.layers[1].mlp.down_proj.input_quantizer.rotation.signs
        kv = model.model.layers[1].self_attn.kv_quantizer.rotation.signs
        return down.clone(), kv.clone()

    all_on = signs(RotationChoice.uniform(2, True))
    first_off = signs(RotationChoice(True, [True, True], [False, True], [False, True]))
    assert torch.equal(all_on[0], first_off[0]) and torch.equal(all_on[1], first_off[1])
