"""The library verbs behind ``pvtune compress`` and ``pvtune export``: the same rules as the
commands (output names and refusals, dense types from a budget, recorded sources), in
library terms, and the same files."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from pvtune.checkpoint.format import WEIGHTS_PREFIX
from pvtune.cli import main
from pvtune.errors import ConfigError, OutputError
from pvtune.export import GGUFExportConfig, export_gguf
from pvtune.llm.budget import BudgetConfig
from pvtune.llm.checkpoint import read_meta
from pvtune.llm.compress_checkpoint import CompressJob, compress_checkpoint, default_output
from pvtune.llm.compress_request import CompressRequest
from pvtune.llm.data import EvalConfig
from pvtune.llm.export_checkpoint import (
    default_aqlm_output,
    default_gguf_output,
    dense_types,
    export_checkpoint_aqlm,
    export_checkpoint_gguf,
)
from pvtune.llm.model import is_pvtune_checkpoint
from pvtune.llm.sources import (
    DEFAULT_MODEL,
    model_source,
    recorded_gguf,
    recorded_model,
    reference_source,
)
from tests.export.conftest import tiny
from tests.llm.conftest import build_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FLAGS = ["--method", "rtn", "--format", "q4_0", "--num-seqs", "2", "--seq-len", "16",
         "--eval-window", "16", "--eval-windows", "2", "--max-new-tokens", "0"]


def job(text_file, **kw) -> CompressJob:
    request = CompressRequest(method="rtn", format="q4_0", num_sequences=2, sequence_length=16)
    return CompressJob(request=request, calib_text=text_file, eval_text=text_file,
                       evaluation=EvalConfig(window=16, max_windows=2), **kw)


@pytest.fixture(scope="module")
def compressed(llama_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("verb") / "c"
    return compress_checkpoint(llama_dir, out, job(text_file))


def test_the_verb_writes_what_the_command_writes(compressed, llama_dir, text_file, tmp_path):
    assert is_pvtune_checkpoint(compressed.output)
    meta = read_meta(compressed.output)
    assert meta["source_model"] == str(llama_dir.resolve())
    assert set(compressed.results) == {"reference", "compressed"}
    assert meta["evaluation"]["compressed"]["perplexity"] == \
        compressed.results["compressed"]["perplexity"]
    assert compressed.size_bytes > 0 and meta["bits"] == compressed.meta["bits"]
    out = tmp_path / "cli"
    assert main(["compress", str(llama_dir), *FLAGS, "--calib-text", str(text_file),
                 "--eval-text", str(text_file), "--output", str(out)]) == 0
    ours = load_file(next(compressed.output.glob(f"{WEIGHTS_PREFIX}*.safetensors")))
    theirs = load_file(next(out.glob(f"{WEIGHTS_PREFIX}*.safetensors")))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].equal(theirs[k]) for k in ours)


def test_default_output_names_what_was_asked():
    assert default_output(CompressRequest()).name == "compressed-aqlm-2x8g8"
    assert default_output(CompressRequest(format="q2_0")).name == "compressed-gptq-q2_0"
    assert default_output(CompressRequest(method="rtn", bits=3)).name == "compressed-rtn-3bit"
    budget = BudgetConfig.for_types(target_bytes=60 * 2**20)
    assert default_output(CompressRequest(budget=budget)).name == "compressed-gptq-60mib"


def test_the_verb_refuses_in_library_terms(llama_dir, text_file, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty") as err:
        compress_checkpoint(llama_dir, busy, job(text_file))
    assert "--" not in str(err.value)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="is the source model folder"):
        compress_checkpoint(llama_dir, llama_dir, job(text_file, overwrite=True))
    with pytest.raises(ConfigError, match="unknown preset"):
        job(text_file, preset="fastest")
    with pytest.raises(ConfigError, match="size budget"):
        CompressJob(request=CompressRequest(format="q2_0", budget=BudgetConfig.for_types(
            target_bytes=2**20))).config()


def test_export_verbs_write_beside_the_checkpoint_and_refuse_to_replace(compressed, tmp_path):
    source = compressed.output
    outcome = export_checkpoint_gguf(source)
    assert outcome.report.path == default_gguf_output(source) == source.with_name("c.gguf")
    assert outcome.report.path.stat().st_size == outcome.report.file_bytes
    assert sum(outcome.type_counts.values()) == len(outcome.report.tensor_types)
    assert outcome.report.tensor_types["token_embd.weight"] == "q8_0"
    with pytest.raises(OutputError, match="exists") as err:
        export_checkpoint_gguf(source)
    assert "--" not in str(err.value)
    again = export_checkpoint_gguf(source, overwrite=True, embedding_type="f16")
    assert again.report.tensor_types["token_embd.weight"] == "f16"
    with pytest.raises(OutputError, match="is a folder"):
        export_checkpoint_gguf(source, tmp_path, overwrite=True)
    assert default_aqlm_output(source).name == "c-aqlm"
    with pytest.raises(ConfigError, match="AQLM"):
        export_checkpoint_aqlm(source, tmp_path / "a")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        export_checkpoint_aqlm(source, tmp_path / "f", overwrite=True)


def test_dense_types_follow_the_budget_plan():
    assert dense_types({}) == ("q8_0", None)
    assert dense_types({"budget_plan": {"types": {"embeddings": "f16", "head": "f16"}}}) \
        == ("f16", "f16")
    assert dense_types({"budget_plan": {"types": {"embeddings": "q4_0"}}}) == ("q8_0", None)
    assert dense_types({"budget_plan": "damaged"}) == ("q8_0", None)


def test_sources_record_and_find_their_gguf_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("PVTUNE_CACHE", str(tmp_path / "cache"))
    tokenizer = build_tokenizer(tmp_path / "tok")
    export_gguf(tiny("llama", tokenizer), tokenizer, tmp_path / "m.gguf",
                GGUFExportConfig(embedding_type="f32", dense_type="f32"))
    source = model_source(tmp_path / "m.gguf")
    assert source.record == str((tmp_path / "m.gguf").resolve()) and source.path.is_dir()
    assert source.loadable == source.path and not source.is_default
    # a checkpoint compressed from a GGUF file finds the metadata recorded from it
    assert recorded_gguf({"source_model": source.record})["general.architecture"] == "llama"
    assert recorded_gguf({"source_model": str(tmp_path / "gone")}) == {}
    assert recorded_gguf({"source_model": 3}) == {}
    hub = model_source("someone/some-model")
    assert hub.path is None and hub.loadable == "someone/some-model"
    assert recorded_model(DEFAULT_MODEL) is None and recorded_model("x") == "x"
    # a checkpoint's reference: the model its record names, or none
    assert reference_source({"source_model": source.record}) == source
    assert reference_source({"source_model": "someone/some-model"}) == hub
    assert reference_source({}) is None
