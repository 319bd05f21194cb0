"""The whole compression pipeline on tiny random Llama and Qwen2 models."""

from __future__ import annotations

import copy

import pytest
import torch

from pvtune.checkpoint import CheckpointError
from pvtune.init import AQLMInitConfig, GPTQConfig
from pvtune.llm.activations import XTXCollector, capture_block_inputs, run_block
from pvtune.llm.checkpoint import bits_report, load_compressed, read_meta, save_compressed
from pvtune.llm.data import CalibrationConfig, calibration_batch, tokenize_stream
from pvtune.llm.evaluate import perplexity
from pvtune.llm.model import find_blocks, load_causal_lm
from pvtune.llm.pipeline import BlockFinetuneConfig, CompressConfig, compress_model
from pvtune.nn import dequantize_, quantized_layers
from pvtune.reprs import AQLMConfig, BinaryConfig, UniformConfig
from tests.llm.conftest import TEXT

AQLM_TINY = AQLMConfig(num_codebooks=2, nbits_per_codebook=4, in_group_size=8, kmeans_iters=3)


def calib(tokenizer, n=4, length=24):
    stream = tokenize_stream(tokenizer, [TEXT])
    return calibration_batch(stream, CalibrationConfig(num_sequences=n, sequence_length=length))


def test_captured_inputs_replay_the_model(model_dir):
    model, tok = load_causal_lm(model_dir)
    ids = calib(tok)
    structure = find_blocks(model)
    hidden, extras = capture_block_inputs(model, structure, ids, batch_size=2)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        x = hidden.clone()
        assert torch.equal(x, ref[0])
        for i, block in enumerate(structure.blocks):
            x = torch.cat([run_block(block, x[s : s + 2], extras[i]) for s in (0, 2)])
        torch.testing.assert_close(model.model.norm(x), ref[-1])
    assert all(type(b).__name__.endswith("DecoderLayer") for b in structure.blocks)


def test_xtx_collector_matches_manual():
    lin = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    col = XTXCollector(lin)
    x = torch.randn(7, 5)
    col.new_call()
    lin(x)
    col.remove()
    torch.testing.assert_close(col.xtx("0"), x.T @ x / 7)
    h = lin[0](x).detach()
    torch.testing.assert_close(col.xtx("1"), h.T @ h / 7)


@pytest.mark.parametrize(("method", "representation", "method_config", "finetune"), [
    ("rtn", UniformConfig(bits=4, group_size=16), None, None),
    ("gptq", UniformConfig(bits=3, group_size=16), GPTQConfig(), None),
    ("aqlm", AQLM_TINY, AQLMInitConfig(max_rounds=2, codebook_steps=5), None),
    ("aqlm", AQLM_TINY, AQLMInitConfig(max_rounds=1, codebook_steps=5),
     BlockFinetuneConfig(steps=4, lr=1e-3)),
    ("rtn", BinaryConfig(group_size=16), None, None),
])
def test_pipeline_end_to_end(model_dir, method, representation, method_config, finetune):
    """The compressed model's logits error is measured against the error of zeroing every
    compressed linear (the model losing them entirely), and must be in proportion to the
    weights' own relative error: at most 3x it (round-to-nearest measured about 2x), and
    below it for the calibration-aware methods, which minimise the output error."""
    model, tok = load_causal_lm(model_dir)
    ids = calib(tok)
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".layers." in n}
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        null = copy.deepcopy(model)
        for name in originals:
            null.get_submodule(name).weight.zero_()
        null_error = float((null(input_ids=ids).logits - ref).pow(2).mean())
    config = CompressConfig(method=method, representation=representation,
                            method_config=method_config, block_finetune=finetune, batch_size=2)
    report = compress_model(model, ids, config, progress=False)
    layers = quantized_layers(model)
    assert len(layers) == 14 and len(report.layers) == 14
    with torch.no_grad():
        out = model(input_ids=ids).logits
        weight_nsr = sum(float((layers[n].weight - w).pow(2).sum()) for n, w in originals.items()) \
            / sum(float(w.pow(2).sum()) for w in originals.values())
    assert torch.isfinite(out).all()
    relative = float((out - ref).pow(2).mean()) / null_error
    assert relative <= 3 * weight_nsr, (relative, weight_nsr)
    if method != "rtn":
        assert relative < weight_nsr, (relative, weight_nsr)
        assert all(r.output_error is not None and 0 <= r.output_error < 1 for r in report.layers)
    if finetune is not None:
        assert all(after <= before for before, after in report.block_losses)
    # the same logits through plain linears holding the decoded weights
    dequantize_(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, out)


def test_gptq_pipeline_beats_rtn_on_calibration_error(llama_dir):
    errors = {}
    for method in ("rtn", "gptq"):
        model, tok = load_causal_lm(llama_dir)
        ids = calib(tok, n=8, length=32)
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        compress_model(model, ids, CompressConfig(method=method, batch_size=4,
                                                  representation=UniformConfig(bits=2,
                                                                               group_size=16)),
                       progress=False)
        with torch.no_grad():
            errors[method] = float((model(input_ids=ids).logits - ref).pow(2).mean())
    assert errors["gptq"] < errors["rtn"]


def test_group_size_incompatible_fails_before_work(llama_dir):
    model, tok = load_causal_lm(llama_dir)
    with pytest.raises(ValueError, match=r"cannot compress layer 'model\.layers\.0\.self_attn"
                                         r"\.q_proj' \(32x32\).*group_size=24"):
        compress_model(model, calib(tok), CompressConfig(
            method="gptq", representation=UniformConfig(bits=3, group_size=24)), progress=False)
    assert not quantized_layers(model)


def test_config_validation():
    with pytest.raises(ValueError, match="method 'gptq' works with UniformConfig"):
        CompressConfig(method="gptq", representation=AQLM_TINY)
    with pytest.raises(ValueError, match="method_config must be a GPTQConfig"):
        CompressConfig(method="gptq", representation=UniformConfig(),
                       method_config=AQLMInitConfig())
    with pytest.raises(KeyError, match="unknown initialisation method 'nope'"):
        CompressConfig(method="nope", representation=UniformConfig())


def test_save_load_same_perplexity_and_bits(model_dir, tmp_path):
    model, tok = load_causal_lm(model_dir)
    ids = calib(tok)
    compress_model(model, ids, CompressConfig(method="aqlm", representation=AQLM_TINY,
                                              method_config=AQLMInitConfig(max_rounds=1),
                                              batch_size=2), progress=False)
    record = save_compressed(model, tok, tmp_path / "ckpt", meta={"note": "test"})
    assert read_meta(tmp_path / "ckpt") == record and record["note"] == "test"
    loaded, loaded_tok = load_causal_lm(tmp_path / "ckpt")
    assert loaded_tok is not None
    windows = calib(tok, n=3, length=20)
    a = perplexity(model, windows, progress=False).perplexity
    b = perplexity(loaded, windows, progress=False).perplexity
    assert a == b
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    bits = bits_report(loaded)
    assert bits == bits_report(model)
    lin = bits["linear_bits_per_param"]
    assert 0 < lin < bits["overall_bits_per_param"] <= 32


def test_corrupted_and_truncated_checkpoints(llama_dir, tmp_path):
    model, tok = load_causal_lm(llama_dir)
    compress_model(model, None, CompressConfig(method="rtn",
                                               representation=UniformConfig(bits=4,
                                                                            group_size=16)),
                   progress=False)
    ckpt = tmp_path / "c"
    save_compressed(model, tok, ckpt)
    weights = next(ckpt.glob("pvtune_model-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged"):
        load_compressed(ckpt)
    weights.unlink()
    with pytest.raises(CheckpointError, match="named by pvtune_layout.json, is missing"):
        load_compressed(ckpt)


def test_xtx_collector_never_mixes_inputs_that_reuse_memory():
    """Two layers fed different tensors at the same address (what the allocator does when a
    temporary is freed and the next one takes its memory): each layer must get its own
    product; layers fed the same tensor object share one."""
    from torch import nn

    from pvtune.llm.activations import XTXCollector

    class SameAddress(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second, self.third = (nn.Linear(8, 4), nn.Linear(8, 4),
                                                   nn.Linear(8, 4))
            self.memory = torch.empty(16, 8)

        def forward(self, x):
            self.memory.copy_(x * 2)
            a = self.first(self.memory[:])  # a view: a new tensor object at that address
            self.memory.copy_(x + 1)
            b = self.second(self.memory[:])  # same address, shape and strides, new values
            return a + b + self.third(self.memory[:])

    module = SameAddress()
    collector = XTXCollector(module)
    x = torch.randn(16, 8)
    for _ in range(3):
        collector.new_call()
        module(x)
    collector.remove()
    for name, inp in (("first", x * 2), ("second", x + 1), ("third", x + 1)):
        torch.testing.assert_close(collector.xtx(name), inp.T @ inp / 16)
