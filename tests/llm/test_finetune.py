"""Global fine-tuning on a tiny model: KL loss, keep-best from the start, resume equality and
refusals, crash-safe resume state, the teacher cache, stored precision, the CLI."""

from __future__ import annotations

import json
import math
import shutil
import time

import pytest
import torch

from pvtune.errors import CheckpointError, ConfigError, TrainingError
from pvtune.llm.bos import BosChoice
from pvtune.llm.checkpoint import bits_report
from pvtune.llm.data import CalibrationConfig, calibration_batch, tokenize_stream
from pvtune.llm.finetune import FinetuneConfig, finetune, kl_loss, lr_factor
from pvtune.llm.model import load_causal_lm
from pvtune.llm.pipeline import CompressConfig, compress_model
from pvtune.llm.resume import RESUME_META
from pvtune.llm.teacher_logits import TeacherLogits
from pvtune.optim import VStepConfig
from pvtune.reprs import (
    AQLMConfig,
    BinaryConfig,
    NMSparseConfig,
    TernaryConfig,
    UniformConfig,
    VQConfig,
)
from tests.checkpoint.crash import run_killed
from tests.llm.conftest import TEXT


def test_kl_loss_matches_definition():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    p = torch.softmax(t, -1)
    manual = (p * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum() / 6
    torch.testing.assert_close(kl_loss(s, t), manual)
    assert float(kl_loss(t, t)) == pytest.approx(0.0, abs=1e-6)


def test_lr_schedules():
    cfg = FinetuneConfig(steps=10, warmup_steps=2, schedule="cosine")
    assert lr_factor(cfg, 0) == 0.5 and lr_factor(cfg, 1) == 1.0
    assert lr_factor(cfg, 2) == pytest.approx(1.0) and lr_factor(cfg, 10) == pytest.approx(0.0)
    assert lr_factor(FinetuneConfig(steps=4, schedule="linear"), 2) == pytest.approx(0.5)
    # progress (the share of a time budget spent) replaces the share of steps done
    lin = FinetuneConfig(steps=1_000_000, schedule="linear", time_budget=60.0)
    assert lr_factor(lin, 3, progress=0.25) == pytest.approx(0.75)
    assert lr_factor(lin, 3, progress=1.7) == 0.0 and lr_factor(lin, 3, progress=-1) == 1.0
    assert lr_factor(cfg, 5, progress=0.5) == pytest.approx(0.5)  # cosine halfway
    assert lr_factor(cfg, 0, progress=0.9) == 0.5  # warm-up counts steps still
    with pytest.raises(ValueError, match="schedule must be"):
        FinetuneConfig(schedule="exp")
    with pytest.raises(ConfigError, match="dense_storage must be one of"):
        FinetuneConfig(dense_storage="int8")


def setup(llama_dir, representation, seq=24, n=6, seed=0):
    student, tok = load_causal_lm(llama_dir)
    teacher, _ = load_causal_lm(llama_dir)
    teacher.requires_grad_(False)
    stream = tokenize_stream(tok, [TEXT])
    ids = calibration_batch(stream, CalibrationConfig(num_sequences=n, sequence_length=seq,
                                                      seed=seed))
    compress_model(student, ids, CompressConfig(method="rtn", representation=representation),
                   progress=False)
    return student, teacher, ids


@pytest.mark.parametrize("strategy", ["subspace_v_ste", "frozen"])
def test_finetune_lowers_kl(llama_dir, strategy):
    student, teacher, ids = setup(llama_dir, UniformConfig(bits=2, group_size=16))
    cfg = FinetuneConfig(steps=12, batch_size=3, lr=1e-2,
                         vstep=VStepConfig(strategy=strategy, lr=0.1, tau=0.05))
    result = finetune(student, TeacherLogits(teacher, ids), ids, cfg, progress=False)
    assert len(result.losses) == 12 and all(math.isfinite(v) for v in result.losses)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    if strategy == "frozen":
        assert all(f == 0 for f in result.fraction_changed)
    else:
        assert any(f > 0 for f in result.fraction_changed)


def test_default_lr_keeps_a_near_lossless_model(tmp_path):
    """From a near-lossless Q4_0 start, the default continuous step does not raise a held-out
    KL; ten times the default (Adam's sign-like first steps on every block scale) does."""
    from pvtune.reprs import GGUFBlockConfig
    from tests.llm.conftest import build_model, build_tokenizer

    tok = build_tokenizer(tmp_path)
    build_model("llama", len(tok), hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    held = {}
    for lr in (FinetuneConfig.lr, 10 * FinetuneConfig.lr):
        student, _ = load_causal_lm(tmp_path)
        teacher, _ = load_causal_lm(tmp_path)
        teacher.requires_grad_(False)
        ids = calibration_batch(tokenize_stream(tok, [TEXT]),
                                CalibrationConfig(num_sequences=8, sequence_length=32, seed=0))
        compress_model(student, ids, CompressConfig(method="rtn",
                                                    representation=GGUFBlockConfig("q4_0")),
                       progress=False)
        with torch.no_grad():
            start = float(kl_loss(student(ids[6:]).logits, teacher(ids[6:]).logits))
        cfg = FinetuneConfig(steps=3, batch_size=2, lr=lr, vstep=VStepConfig(strategy="frozen"))
        finetune(student, TeacherLogits(teacher, ids[:6]), ids[:6], cfg, progress=False)
        with torch.no_grad():
            held[lr] = float(kl_loss(student(ids[6:]).logits, teacher(ids[6:]).logits)) / start
    assert held[FinetuneConfig.lr] < 1.0
    assert held[10 * FinetuneConfig.lr] > 1.3


@pytest.mark.parametrize("representation", [
    UniformConfig(bits=2, group_size=16), BinaryConfig(group_size=16),
    TernaryConfig(group_size=16), NMSparseConfig(n=2, m=4),
    VQConfig(num_codewords=16, group_size=4, kmeans_iters=2),
    AQLMConfig(num_codebooks=1, nbits_per_codebook=4, in_group_size=8, kmeans_iters=2),
], ids=lambda c: c.type_name)
def test_finetuned_model_stays_at_stored_precision(llama_dir, representation):
    """After fine-tuning, every continuous tensor is float16-exact (dense_storage float16):
    the stored bytes, hence the bits, are those of the compressed model."""
    student, teacher, ids = setup(llama_dir, representation)
    before = bits_report(student)
    cfg = FinetuneConfig(steps=3, batch_size=2, lr=1e-3,
                         vstep=VStepConfig(strategy="subspace_v_ste", lr=0.1))
    finetune(student, TeacherLogits(teacher, ids), ids, cfg, progress=False)
    for name, p in student.named_parameters():
        assert torch.equal(p.detach(), p.detach().half().float()), name
    after = bits_report(student)
    assert after["stored_bytes"] == before["stored_bytes"]
    assert after["overall_bits_per_param"] == before["overall_bits_per_param"]


def test_keep_best_considers_the_starting_model(llama_dir):
    """A fine-tune that only makes the model worse saves the starting model (step 0)."""
    student, teacher, ids = setup(llama_dir, UniformConfig(bits=4, group_size=16))
    saved = []
    cfg = FinetuneConfig(steps=3, batch_size=2, lr=0.5, eval_every=1,
                         vstep=VStepConfig(strategy="ste", lr=5.0))
    result = finetune(student, TeacherLogits(teacher, ids), ids, cfg, eval_windows=ids[:2],
                      save_best=lambda model, step: saved.append(step), progress=False)
    assert [s for s, _ in result.evals] == [0, 1, 2, 3]
    assert result.start_perplexity == result.evals[0][1]
    assert result.best_step == 0 and saved == [0]
    assert all(p > result.start_perplexity for _, p in result.evals[1:])


def test_diverged_loss_is_an_error_after_the_best_is_saved(llama_dir):
    student, teacher, ids = setup(llama_dir, UniformConfig(bits=4, group_size=16))
    saved = []
    with torch.no_grad():  # a NaN teacher makes the loss non-finite at the first step
        teacher.lm_head.weight.fill_(float("nan"))
    cfg = FinetuneConfig(steps=3, batch_size=2, vstep=VStepConfig(strategy="frozen"))
    with pytest.raises(TrainingError, match=r"became nan at step 1.*diverged.*step 0"):
        finetune(student, TeacherLogits(teacher, ids), ids, cfg, eval_windows=ids[:2],
                 save_best=lambda model, step: saved.append(step), progress=False)
    assert saved == [0]


RESUME_REP = AQLMConfig(num_codebooks=1, nbits_per_codebook=4, in_group_size=8, kmeans_iters=2)
RESUME_CFG = FinetuneConfig(steps=6, batch_size=2, lr=1e-3, checkpoint_every=2,
                            vstep=VStepConfig(strategy="stochastic_rounding", lr=0.2))


def uninterrupted(llama_dir):
    model, teacher, ids = setup(llama_dir, RESUME_REP)
    finetune(model, TeacherLogits(teacher, ids), ids, RESUME_CFG, progress=False)
    return model.state_dict(), teacher, ids


def same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_reaches_the_same_result(llama_dir, tmp_path):
    want, teacher, ids = uninterrupted(llama_dir)
    b, _, _ = setup(llama_dir, RESUME_REP)
    first = finetune(b, TeacherLogits(teacher, ids), ids, RESUME_CFG, checkpoint_dir=tmp_path,
                     progress=False, stop_at=4)
    assert len(first.losses) == 4
    tensors = [p for p in tmp_path.iterdir() if p.name != RESUME_META]
    assert (tmp_path / RESUME_META).is_file() and len(tensors) == 1  # older states removed
    assert tensors[0].name.startswith("resume_state-")
    assert tensors[0].read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    c, _, _ = setup(llama_dir, RESUME_REP)  # a fresh process would start from the checkpoint
    resumed = finetune(c, TeacherLogits(teacher, ids), ids, RESUME_CFG, checkpoint_dir=tmp_path,
                       progress=False)
    assert len(resumed.losses) == 6
    assert same_state(c.state_dict(), want)


@pytest.mark.parametrize("when", ["before", "after", "mid-write"])
def test_killed_resume_save_resumes_exactly_or_says_why(llama_dir, tmp_path, when):
    """kill -9 at every rename (and mid-write) of the resume state's second save: rerunning
    the command either resumes to the uninterrupted result or refuses with a clear error."""
    want, teacher, ids = uninterrupted(llama_dir)
    for point in range(1, 5):
        work = tmp_path / f"{when}-{point}"
        model, _, _ = setup(llama_dir, RESUME_REP)
        finetune(model, TeacherLogits(teacher, ids), ids, RESUME_CFG, checkpoint_dir=work,
                 progress=False, stop_at=2)  # a complete state at step 2

        def killed_run(work=work, model=model):  # steps 3-4 then the save at step 4
            finetune(model, TeacherLogits(teacher, ids), ids, RESUME_CFG, checkpoint_dir=work,
                     progress=False)

        killed = run_killed(killed_run, point, when)
        fresh, _, _ = setup(llama_dir, RESUME_REP)
        finetune(fresh, TeacherLogits(teacher, ids), ids, RESUME_CFG, checkpoint_dir=work,
                 progress=False)
        assert same_state(fresh.state_dict(), want), (when, point)
        if not killed:
            break


def test_resume_with_other_settings_is_a_clear_error(llama_dir, tmp_path):
    cfg = FinetuneConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, schedule="cosine",
                         vstep=VStepConfig(strategy="subspace_v_ste"))
    student, teacher, ids = setup(llama_dir, UniformConfig(bits=2, group_size=16))
    finetune(student, TeacherLogits(teacher, ids), ids, cfg, checkpoint_dir=tmp_path,
             progress=False, stop_at=2)
    other = FinetuneConfig(steps=4, batch_size=2, lr=2e-3, checkpoint_every=2,
                           schedule="cosine", vstep=VStepConfig(strategy="subspace_v_ste"))
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.001 -> 0.002\)"):
        finetune(student, TeacherLogits(teacher, ids), ids, other, checkpoint_dir=tmp_path,
                 progress=False)
    # evaluation and checkpoint cadence do not change the trajectory: resuming is fine
    same = FinetuneConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=1, eval_every=0,
                          schedule="cosine", vstep=VStepConfig(strategy="subspace_v_ste"))
    resumed = finetune(student, TeacherLogits(teacher, ids), ids, same,
                       checkpoint_dir=tmp_path, progress=False)
    assert len(resumed.losses) == 4


def test_resume_on_other_inputs_is_refused(llama_dir, tmp_path):
    """Another calibration text, teacher, source or BOS choice is never mixed in."""
    cfg = FinetuneConfig(steps=4, batch_size=2, checkpoint_every=2,
                         vstep=VStepConfig(strategy="frozen"))
    student, teacher, ids = setup(llama_dir, UniformConfig(bits=4, group_size=16))
    finetune(student, TeacherLogits(teacher, ids), ids, cfg, checkpoint_dir=tmp_path,
             progress=False, stop_at=2, identity={"teacher": "a"})
    other_ids = ids.flip(0)
    cases = [dict(ids=other_ids, identity={"teacher": "a"}, what="calibration_tokens"),
             dict(ids=ids, identity={"teacher": "b"}, what="teacher"),
             dict(ids=ids, identity={"teacher": "a"}, bos=BosChoice(True, 1, "test"),
                  what="bos"),
             dict(ids=ids, identity={"teacher": "a"}, windows=ids[:1],
                  what="evaluation_tokens")]
    for case in cases:
        with pytest.raises(ConfigError, match=rf"run on other inputs \({case['what']} differ"):
            finetune(student, TeacherLogits(teacher, case["ids"]), case["ids"], cfg,
                     eval_windows=case.get("windows"), checkpoint_dir=tmp_path,
                     progress=False, bos=case.get("bos"), identity=case["identity"])


def test_damaged_resume_state_is_refused(llama_dir, tmp_path):
    cfg = FinetuneConfig(steps=4, batch_size=2, checkpoint_every=2,
                         vstep=VStepConfig(strategy="frozen"))
    student, teacher, ids = setup(llama_dir, UniformConfig(bits=4, group_size=16))
    finetune(student, TeacherLogits(teacher, ids), ids, cfg, checkpoint_dir=tmp_path,
             progress=False, stop_at=2)
    meta_path = tmp_path / RESUME_META
    meta = json.loads(meta_path.read_text())
    meta["step"] = 3  # a record that does not belong to its tensors
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="says step 3 but its tensors hold step 2"):
        finetune(student, TeacherLogits(teacher, ids), ids, cfg, checkpoint_dir=tmp_path,
                 progress=False)
    meta["step"] = 2
    meta_path.write_text(json.dumps(meta))
    tensors = tmp_path / meta["file"]
    tensors.write_bytes(tensors.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="missing or damaged"):
        finetune(student, TeacherLogits(teacher, ids), ids, cfg, checkpoint_dir=tmp_path,
                 progress=False)
    meta_path.write_text("{")
    with pytest.raises(CheckpointError, match="damaged or was written by an older pvtune"):
        finetune(student, TeacherLogits(teacher, ids), ids, cfg, checkpoint_dir=tmp_path,
                 progress=False)


def test_teacher_cache_is_keyed_by_teacher_tokens_and_bos(llama_dir, tmp_path):
    _, teacher, ids = setup(llama_dir, UniformConfig(bits=4, group_size=16))
    live = TeacherLogits(teacher, ids)(torch.tensor([1, 3]))
    cached = TeacherLogits(teacher, ids, tmp_path, fingerprint="teacher-a")
    first = cached(torch.tensor([1, 3]))
    assert torch.equal(first, cached(torch.tensor([1, 3])))
    torch.testing.assert_close(first, live, atol=2e-2, rtol=1e-2)  # float16 on disk
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    # another teacher, other tokens, another BOS choice: new entries, never the old ones
    TeacherLogits(teacher, ids, tmp_path, fingerprint="teacher-b")(torch.tensor([1]))
    TeacherLogits(teacher, ids.flip(1), tmp_path, fingerprint="teacher-a")(torch.tensor([1]))
    with_bos = TeacherLogits(teacher, ids, tmp_path, fingerprint="teacher-a",
                             bos=BosChoice(True, 1, "test"))
    assert not torch.equal(with_bos(torch.tensor([1])), first[:1])
    assert len(list(tmp_path.glob("*.safetensors"))) == 5
    # a damaged entry is recomputed, not used and not a traceback
    for path in tmp_path.glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:20])
    assert torch.equal(cached(torch.tensor([1, 3])), first)


def test_cli_finetune(llama_dir, text_file, tmp_path, capsys):
    from pvtune.cli import main
    from pvtune.llm.checkpoint import read_meta

    ckpt = tmp_path / "c"
    assert main(["compress", str(llama_dir), "--method", "rtn", "--bits", "2",
                 "--group-size", "16", "--calib-text", str(text_file), "--no-eval",
                 "--num-seqs", "2", "--seq-len", "16", "--output", str(ckpt),
                 "--max-new-tokens", "2"]) == 0
    out = tmp_path / "f"
    args = ["finetune", str(ckpt), "--steps", "3", "--num-seqs", "4", "--seq-len", "16",
            "--calib-text", str(text_file), "--eval-text", str(text_file), "--eval-window",
            "16", "--output", str(out), "--checkpoint-every", "2", "--cache-teacher"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "perplexity, start -> best" in printed and "discrete step time" in printed
    assert "bits/param (whole model, stored)" in printed and "size on disk" in printed
    meta = read_meta(out)
    assert meta["teacher"] == str(llama_dir.resolve())  # recorded absolute at compress time
    assert meta["finetune_result"]["evals"][0][0] == 0
    assert meta["bits"]["stored_bytes"] == read_meta(ckpt)["bits"]["stored_bytes"]
    assert main(["eval", str(out), "--eval-text", str(text_file), "--eval-window", "16",
                 "--max-new-tokens", "2"]) == 0
    # a rerun into the same output is refused, not mixed; --overwrite starts afresh
    capsys.readouterr()
    assert main(args) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    shutil.rmtree(out)


def test_gradient_accumulation_equals_the_larger_batch(llama_dir):
    """Two micro-batches of 1 sequence take the step one batch of 2 takes: the V step reads
    the dense gradient accumulated over both (not only the last micro-batch's)."""
    states = []
    for batch_size, grad_accum in ((2, 1), (1, 2)):
        student, teacher, ids = setup(llama_dir, UniformConfig(bits=2, group_size=16))
        # tau 0.5 never binds here (about 5% of groups move a step): a binding cap would
        # rank near-equal decreases, whose order the two floating-point sums may swap
        cfg = FinetuneConfig(steps=3, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2,
                             vstep=VStepConfig(strategy="subspace_v_ste", lr=0.1, tau=0.5))
        result = finetune(student, TeacherLogits(teacher, ids), ids, cfg, progress=False)
        states.append((student.state_dict(), result.losses))
        assert result.tokens_per_step == 2 * ids.shape[1]  # both see the same tokens a step
    (a, la), (b, lb) = states
    assert la == pytest.approx(lb, rel=1e-4)
    codes = [k for k, v in a.items() if v.dtype == torch.uint8]
    assert codes and all(torch.equal(a[k], b[k]) for k in codes)
    assert any(f > 0 for f in result.fraction_changed)


def test_a_time_budget_stops_in_time_and_keeps_the_best(llama_dir):
    """Under a 3 s budget with no step limit to speak of: the run stops by the clock, within
    one evaluation interval of the budget, evaluates where it stopped, and the model saved is
    the best one evaluated."""
    import time

    student, teacher, ids = setup(llama_dir, UniformConfig(bits=2, group_size=16))
    windows = ids[:2]
    saved = []
    cfg = FinetuneConfig(steps=1_000_000, batch_size=2, lr=1e-2, eval_every=4, time_budget=3.0,
                         vstep=VStepConfig(strategy="subspace_v_ste", lr=0.1, tau=0.05))
    t0 = time.perf_counter()
    result = finetune(student, TeacherLogits(teacher, ids), ids, cfg, windows,
                      save_best=lambda model, step: saved.append(step), progress=False)
    elapsed = time.perf_counter() - t0
    steps = len(result.losses)
    assert result.stopped_by_time and 4 <= steps < 1_000_000
    step_s = result.seconds_forward_backward / steps
    interval = cfg.eval_every * 3 * step_s  # a step's share of all its work, generously
    assert elapsed <= cfg.time_budget + interval + 1.0, (elapsed, steps)
    assert elapsed >= cfg.time_budget - interval - 1.0, (elapsed, steps)
    assert result.evals[-1][0] == steps  # the closing evaluation is where it stopped
    assert saved[-1] == result.best_step
    assert result.best_perplexity == min(p for _, p in result.evals)
    with pytest.raises(ConfigError, match="time_budget"):
        FinetuneConfig(time_budget=0)


@pytest.mark.parametrize("schedule", ["linear", "constant"])
def test_a_schedule_under_a_time_budget_runs_over_the_time(llama_dir, monkeypatch, schedule):
    """With a time budget and a million-step bound, ``linear`` decays with the clock: the
    factor falls step by step and is near zero at the end, where a step count would have
    kept it at 1; ``constant`` stays at 1."""
    import pvtune.llm.finetune as ft

    factors, times = [], []

    def spy(config, step, progress=None):
        times.append(time.perf_counter())
        factors.append(lr_factor(config, step, progress))
        return factors[-1]

    monkeypatch.setattr(ft, "lr_factor", spy)
    student, teacher, ids = setup(llama_dir, UniformConfig(bits=2, group_size=16))
    budget = 2.0
    cfg = FinetuneConfig(steps=1_000_000, batch_size=2, lr=1e-3, schedule=schedule,
                         time_budget=budget, vstep=VStepConfig(strategy="ste", lr=0.01))
    result = finetune(student, TeacherLogits(teacher, ids), ids, cfg, progress=False)
    end = time.perf_counter()
    assert result.stopped_by_time and len(factors) == len(result.losses) >= 3
    if schedule == "constant":
        assert factors == [1.0] * len(factors)
    else:
        assert all(a > b for a, b in zip(factors[:-1], factors[1:], strict=True))
        assert factors[0] > 0.8 and factors[-1] >= 0.0, factors
        # the factor is 1 - (time spent) / budget: at least the time since the first step
        for f, t in zip(factors, times, strict=True):
            assert f <= 1 - (t - times[0]) / budget + 0.05, (factors, times)
        # the run stops once the budget is spent, so its last step began at most the time
        # that step (and the closing evaluation) took before the end of the budget
        assert factors[-1] <= (end - times[-1]) / budget + 0.05, (factors, end - times[-1])


def test_a_time_budget_shows_time_left_not_a_step_total(llama_dir, capsys):
    """The progress bar of a run the clock ends shows the minutes left and neither the
    million-step bound nor an ETA from it."""
    student, teacher, ids = setup(llama_dir, UniformConfig(bits=2, group_size=16))
    cfg = FinetuneConfig(steps=1_000_000, batch_size=2, time_budget=1.0,
                         vstep=VStepConfig(strategy="ste", lr=0.01))
    finetune(student, TeacherLogits(teacher, ids), ids, cfg, progress=True)
    err = capsys.readouterr().err
    assert "left=" in err and "1000000" not in err, err[-500:]


def test_cli_time_budget_is_a_duration(llama_dir, text_file, tmp_path, capsys):
    from pvtune.cli import main

    ckpt = tmp_path / "c"
    assert main(["compress", str(llama_dir), "--method", "rtn", "--bits", "4", "--group-size",
                 "16", "--calib-text", str(text_file), "--no-eval", "--num-seqs", "2",
                 "--seq-len", "16", "--max-new-tokens", "0", "--output", str(ckpt)]) == 0
    assert main(["finetune", str(ckpt), "--time-budget", "2s", "--num-seqs", "2", "--seq-len",
                 "16", "--calib-text", str(text_file), "--eval-text", str(text_file),
                 "--eval-window", "16", "--output", str(tmp_path / "f")]) == 0
    from pvtune.llm.checkpoint import read_meta

    done = read_meta(tmp_path / "f")["finetune_result"]
    assert done["stopped_by_time"] and len(done["losses"]) >= 1
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", str(ckpt), "--time-budget", "soon", "--output", str(tmp_path / "g")])
    assert exit_info.value.code == 2
    assert "expected a positive duration such as 90s, 10m or 1h" in capsys.readouterr().err
