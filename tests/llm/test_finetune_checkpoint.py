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


def test_presets_fill_what_is_not_given():
    from pvtune.errors import ConfigError
    from pvtune.llm.finetune_checkpoint import FINETUNE_PRESETS, finetune_job

    standard = finetune_job()
    assert standard.config.steps == 50 and standard.config.time_budget is None
    assert standard.calibration == CalibrationConfig(num_sequences=128, sequence_length=256)
    assert standard.evaluation.max_windows == 32 and standard.chat_data == 0
    demo = finetune_job("demo")
    assert demo.config.steps == 20 and demo.chat_data == 32 and demo.evaluation.max_windows == 16
    quality = finetune_job("quality")
    assert quality.config.time_budget == 3600 and quality.config.steps == TIME_BUDGET_MAX_STEPS
    assert quality.config.eval_every == TIME_BUDGET_EVAL_EVERY
    # the hour's schedule decays linearly (one_hour.md); the others stay constant
    assert quality.config.schedule == "linear" and standard.config.schedule == "constant"
    assert finetune_job("quality", schedule="constant").config.schedule == "constant"
    assert finetune_job("quality", schedule=None).config.schedule == "linear"
    assert quality.calibration.num_sequences == FINETUNE_PRESETS["quality"].calibration \
        .num_sequences == 1024
    # what is given wins; settings reach the config; no evaluation when asked
    mine = finetune_job("quality", steps=7, time_budget=60, num_seqs=3, seq_len=9, chat_data=0,
                        eval_windows=2, seed=4, lr=1e-3, batch_size=1)
    assert (mine.config.steps, mine.config.time_budget, mine.config.lr) == (7, 60, 1e-3)
    assert mine.calibration == CalibrationConfig(num_sequences=3, sequence_length=9, seed=4)
    assert mine.chat_data == 0 and mine.evaluation.max_windows == 2 and mine.config.seed == 4
    assert finetune_job(evaluate=False).evaluation is None
    # a time budget on the standard preset: time alone decides, as without presets
    assert finetune_job(time_budget=60).config.steps == TIME_BUDGET_MAX_STEPS
    with pytest.raises(ConfigError, match="no fine-tuning preset 'fast'; known: demo"):
        finetune_job("fast")


def test_cli_preset_runs_and_its_flags_override(checkpoint, text_file, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["finetune", str(checkpoint), "--preset", "demo", "--steps", "1",
                 "--chat-data", "0", "--num-seqs", "2", "--seq-len", "16", "--eval-window",
                 "16", "--eval-windows", "1", "--calib-text", str(text_file), "--eval-text",
                 str(text_file), "--output", str(out)]) == 0
    assert "| steps" in capsys.readouterr().out and is_pvtune_checkpoint(out)
    assert read_meta(out)["finetune_config"]["steps"] == 1  # the flag, not the preset's 20
