"""AQLM format: export and import bit-exact, transformers' own loader agrees (slow, with
the ``aqlm`` package installed)."""

from __future__ import annotations

import json

import pytest
import torch

from pvtune import AQLMConfig, quantize_
from pvtune.errors import ConfigError
from pvtune.export.aqlm import export_aqlm, from_signed_codes, import_aqlm, to_signed_codes
from pvtune.llm.checkpoint import load_compressed
from pvtune.nn.quantize import quantized_layers
from tests.export.conftest import tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CFG = AQLMConfig(num_codebooks=2, nbits_per_codebook=8, in_group_size=8, kmeans_iters=2,
                 beam_size=1)


def aqlm_model(kind, tokenizer):
    model = tiny(kind, tokenizer)
    quantize_(model, CFG, lambda m, n: n.startswith("model.layers"))
    for p in model.parameters():  # what a pvtune checkpoint stores
        p.data = p.data.half().float()
    return model


def test_signed_codes_round_trip():
    codes = torch.arange(256, dtype=torch.uint8)
    signed = to_signed_codes(codes, 8)
    assert signed.dtype == torch.int8 and int(signed[128]) == -128 and int(signed[127]) == 127
    assert torch.equal(from_signed_codes(signed, 8, torch.uint8), codes)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_export_import_bit_exact(kind, tokenizer, tmp_path):
    model = aqlm_model(kind, tokenizer)
    report = export_aqlm(model, tokenizer, tmp_path / "aqlm")
    assert report.layers == 14
    config = json.loads((tmp_path / "aqlm" / "config.json").read_text())
    q = config["quantization_config"]
    assert q["quant_method"] == "aqlm" and q["num_codebooks"] == 2
    assert q["nbits_per_codebook"] == 8 and q["in_group_size"] == 8
    assert "lm_head" in q["linear_weights_not_to_quantize"]
    from safetensors.torch import load_file

    state = load_file(tmp_path / "aqlm" / "model.safetensors")
    codes = state["model.layers.0.mlp.down_proj.codes"]
    assert codes.dtype == torch.int8 and tuple(codes.shape) == (128, 256 // 8, 2)
    assert state["model.layers.0.mlp.down_proj.codebooks"].shape == (2, 256, 1, 8)
    assert state["model.layers.0.mlp.down_proj.scales"].shape == (128, 1, 1, 1)
    back, _ = import_aqlm(tmp_path / "aqlm")
    ours, theirs = quantized_layers(model), quantized_layers(back)
    assert ours.keys() == theirs.keys()
    for name, layer in ours.items():
        a, b = layer.qweight, theirs[name].qweight
        assert torch.equal(a.codes, b.codes) and torch.equal(a.codebooks, b.codebooks)
        assert torch.equal(a.scales, b.scales)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_export_refuses_a_model_without_aqlm_layers(tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="AQLM initialiser"):
        export_aqlm(tiny("llama", tokenizer), tokenizer, tmp_path / "x")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_transformers_with_aqlm_package_reproduces_pvtune(kind, tokenizer, tmp_path):
    """transformers + aqlm (its CPU lookup-table kernel, row by row) gives pvtune's logits.

    The kernel runs on one numba thread: aqlm 1.1.7's CPU kernel parallelises over input
    groups and adds into one shared output vector, a data race that loses additions with
    two or more threads (measured here: 0.12 max error on a 128x256 layer, exact on one)."""
    pytest.importorskip("aqlm", reason="needs pip install 'pvtune[aqlm]'")
    import numba
    from transformers import AutoModelForCausalLM

    numba.set_num_threads(1)

    model = aqlm_model(kind, tokenizer)
    export_aqlm(model, tokenizer, tmp_path / "aqlm")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "aqlm", dtype=torch.float32).eval()
    assert type(theirs.model.layers[0].mlp.down_proj).__module__.startswith("aqlm")
    ids = torch.tensor([[5, 17, 42, 99, 3, 8, 13, 21]])
    with torch.no_grad():
        ref = model(ids).logits
        torch.testing.assert_close(theirs(ids).logits, ref, rtol=1e-4, atol=1e-4)
        one = ids[:, :1]
        torch.testing.assert_close(theirs(one).logits, model(one).logits, rtol=1e-4, atol=1e-4)


def test_cli_export_to_aqlm(llama_dir, text_file, tmp_path, capsys):
    from pvtune.cli import main

    ckpt = tmp_path / "ckpt"
    assert main(["compress", str(llama_dir), "--method", "aqlm", "--codebooks", "1x6g8",
                 "--preset", "demo", "--calib-text", str(text_file), "--no-eval",
                 "--num-seqs", "2", "--seq-len", "16", "--block-finetune-steps", "0",
                 "--max-new-tokens", "0", "--output", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["export", str(ckpt), "--to", "aqlm", "--output", str(tmp_path / "out")]) == 0
    assert "from_pretrained" in capsys.readouterr().out
    back, _ = import_aqlm(tmp_path / "out")
    model, _ = load_compressed(ckpt)
    for name, layer in quantized_layers(model).items():
        assert torch.equal(layer.qweight.codes, quantized_layers(back)[name].qweight.codes)
    assert main(["export", str(ckpt), "--to", "aqlm", "--output", str(tmp_path / "out")]) == 2
