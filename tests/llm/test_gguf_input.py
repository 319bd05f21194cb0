"""A GGUF file as the model: dequantized once through transformers, cached, and used by the
library and every CLI verb like a model directory."""

from __future__ import annotations

import pytest
import torch

from pvtune.cli import main
from pvtune.errors import ModelError
from pvtune.export import GGUFExportConfig, export_gguf
from pvtune.llm.assets import prepared_gguf_dir
from pvtune.llm.checkpoint import read_meta
from pvtune.llm.model import load_causal_lm, model_fingerprint
from tests.export.conftest import tiny
from tests.llm.conftest import build_tokenizer
from tests.test_cli import error_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PVTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def gguf_of(kind, tokenizer, path):
    model = tiny(kind, tokenizer)
    export_gguf(model, tokenizer, path, GGUFExportConfig(embedding_type="f32", dense_type="f32"))
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_gguf_file_loads_as_the_model_it_holds(kind, tokenizer, tmp_path, cache):
    original = gguf_of(kind, tokenizer, tmp_path / "m.gguf")
    model, tok = load_causal_lm(tmp_path / "m.gguf")
    ids = torch.tensor([tokenizer("The quick brown fox jumps").input_ids])
    assert tok("The quick brown fox jumps").input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    # prepared once: the second load reuses the cached directory
    prepared = prepared_gguf_dir(tmp_path / "m.gguf")
    assert prepared.parent == cache / "models"
    stamp = (prepared / "manifest.json").stat().st_mtime_ns
    load_causal_lm(tmp_path / "m.gguf")
    assert (prepared / "manifest.json").stat().st_mtime_ns == stamp
    assert model_fingerprint(tmp_path / "m.gguf") == model_fingerprint(prepared)


def test_a_changed_gguf_file_is_prepared_again(tokenizer, tmp_path, cache):
    gguf_of("llama", tokenizer, tmp_path / "m.gguf")
    first = prepared_gguf_dir(tmp_path / "m.gguf")
    gguf_of("qwen2", tokenizer, tmp_path / "m.gguf")
    second = prepared_gguf_dir(tmp_path / "m.gguf")
    assert first != second
    assert type(load_causal_lm(tmp_path / "m.gguf")[0]).__name__ == "Qwen2ForCausalLM"


def test_cli_compresses_and_evaluates_a_gguf_file(tokenizer, text_file, tmp_path, cache, capsys):
    gguf_of("llama", tokenizer, tmp_path / "m.gguf")
    out = tmp_path / "ckpt"
    assert main(["compress", str(tmp_path / "m.gguf"), "--method", "rtn", "--bits", "4",
                 "--group-size", "16", "--calib-text", str(text_file), "--eval-text",
                 str(text_file), "--num-seqs", "2", "--seq-len", "16", "--eval-window", "16",
                 "--max-new-tokens", "0", "--output", str(out)]) == 0
    assert read_meta(out)["source_model"] == str((tmp_path / "m.gguf").resolve())
    # the GGUF file it came from teaches the fine-tune
    assert main(["finetune", str(out), "--steps", "1", "--num-seqs", "2", "--seq-len", "16",
                 "--calib-text", str(text_file), "--no-eval", "--output",
                 str(tmp_path / "ft")]) == 0
    assert read_meta(tmp_path / "ft")["teacher"] == str((tmp_path / "m.gguf").resolve())
    assert main(["eval", str(tmp_path / "m.gguf"), "--eval-text", str(text_file),
                 "--eval-window", "16"]) == 0
    assert "perplexity" in capsys.readouterr().out.lower()


def test_a_file_that_is_not_a_model_is_one_clear_error(tmp_path, cache, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF not really")
    with pytest.raises(ModelError, match="cannot read the GGUF file"):
        load_causal_lm(bad)
    assert main(["eval", str(bad)]) == 2
    assert "cannot read the GGUF file" in error_of(capsys)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    assert main(["eval", str(other)]) == 2
    assert "is a file, not a model" in error_of(capsys)
