"""The library verb behind ``pvtune finetune``: a saved checkpoint in, the best model out,
the same rules as the command (teacher, output refusals, time-budget defaults)."""

from __future__ import annotations

import pytest

from pvtune.cli import main
from pvtune.errors import ModelError, OutputError
from pvtune.llm.checkpoint import read_meta
from pvtune.llm.data import CalibrationConfig, EvalConfig
from pvtune.llm.finetune_checkpoint import (
    TIME_BUDGET_EVAL_EVERY,
    TIME_BUDGET_MAX_STEPS,
    FinetuneJob,
    default_output,
    finetune_checkpoint,
    finetune_config,
)
from pvtune.llm.model import is_pvtune_checkpoint


@pytest.fixture(scope="module")
def checkpoint(llama_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("verb") / "c"
    assert main(["compress", str(llama_dir), "--method", "rtn", "--bits", "4", "--group-size",
                 "16", "--calib-text", str(text_file), "--no-eval", "--num-seqs", "2",
                 "--seq-len", "16", "--max-new-tokens", "0", "--output", str(out)]) == 0
    return out


def job(text_file, dense_storage="float16", **kw) -> FinetuneJob:
    return FinetuneJob(config=finetune_config(steps=2, dense_storage=dense_storage),
                       calib_text=text_file, eval_text=text_file,
                       calibration=CalibrationConfig(num_sequences=2, sequence_length=16),
                       evaluation=EvalConfig(window=16, max_windows=2), **kw)


def test_time_budget_defaults():
    assert finetune_config().steps == 50 and finetune_config().eval_every == 0
    budgeted = finetune_config(time_budget=60)
    assert budgeted.steps == TIME_BUDGET_MAX_STEPS and budgeted.eval_every == TIME_BUDGET_EVAL_EVERY
    assert finetune_config(steps=7, eval_every=3, time_budget=60).steps == 7


def test_verb_saves_the_best_model_and_its_record(checkpoint, text_file, tmp_path):
    out = tmp_path / "ft"
    outcome = finetune_checkpoint(checkpoint, out, job(text_file, dense_storage="float32"),
                                  progress=False)
    assert is_pvtune_checkpoint(out) and outcome.output == out
    meta = read_meta(out)
    assert meta["finetune_result"]["losses"] == outcome.result.losses
    assert len(outcome.result.losses) == 2 and outcome.size_bytes > 0
    assert meta["best_step"] == outcome.result.best_step
    # the checkpoint's dense storage is kept, whatever the config said
    assert meta["finetune_config"]["dense_storage"] == "float16"
    assert default_output(checkpoint, "ste").name == "c-finetuned-ste"


def test_verb_refuses_in_library_terms(checkpoint, text_file, tmp_path):
    with pytest.raises(ModelError, match="not a pvtune checkpoint"):
        finetune_checkpoint(tmp_path, tmp_path / "x", job(text_file))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty") as err:
        finetune_checkpoint(checkpoint, busy, job(text_file))
    assert "--" not in str(err.value)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="is the source checkpoint"):
        finetune_checkpoint(checkpoint, checkpoint, job(text_file, overwrite=True))
