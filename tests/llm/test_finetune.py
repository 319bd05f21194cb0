"""Global fine-tuning on a tiny model: KL loss, resume equality, safetensors state, CLI."""

from __future__ import annotations

import math

import pytest
import torch

from pvtune.llm.data import CalibrationConfig, calibration_batch, tokenize_stream
from pvtune.llm.finetune import (
    RESUME_TENSORS,
    FinetuneConfig,
    TeacherLogits,
    finetune,
    kl_loss,
    lr_factor,
)
from pvtune.llm.model import load_causal_lm
from pvtune.llm.pipeline import CompressConfig, compress_model
from pvtune.optim import VStepConfig
from pvtune.reprs import AQLMConfig, UniformConfig
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
    with pytest.raises(ValueError, match="schedule must be"):
        FinetuneConfig(schedule="exp")


def setup(llama_dir, representation):
    student, tok = load_causal_lm(llama_dir)
    teacher, _ = load_causal_lm(llama_dir)
    stream = tokenize_stream(tok, [TEXT])
    ids = calibration_batch(stream, CalibrationConfig(num_sequences=6, sequence_length=24))
    compress_model(student, ids, CompressConfig(method="rtn", representation=representation),
                   progress=False)
    return student, teacher, ids


@pytest.mark.parametrize("strategy", ["subspace_v_ste", "frozen"])
def test_finetune_lowers_kl(llama_dir, strategy):
    student, teacher, ids = setup(llama_dir, UniformConfig(bits=2, group_size=16))
    cfg = FinetuneConfig(steps=12, batch_size=3, lr=1e-2,
                         vstep=VStepConfig(strategy=strategy, lr=3e-3, tau=0.05))
    result = finetune(student, TeacherLogits(teacher, ids), ids, cfg, progress=False)
    assert len(result.losses) == 12 and all(math.isfinite(v) for v in result.losses)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])
    if strategy == "frozen":
        assert all(f == 0 for f in result.fraction_changed)
    else:
        assert any(f > 0 for f in result.fraction_changed)


def test_resume_reaches_the_same_result(llama_dir, tmp_path):
    rep = AQLMConfig(num_codebooks=1, nbits_per_codebook=4, in_group_size=8, kmeans_iters=2)
    cfg = FinetuneConfig(steps=6, batch_size=2, lr=1e-3, checkpoint_every=3,
                         vstep=VStepConfig(strategy="stochastic_rounding", lr=1e-2))
    a, teacher, ids = setup(llama_dir, rep)
    finetune(a, TeacherLogits(teacher, ids), ids, cfg, progress=False)

    b, _, _ = setup(llama_dir, rep)
    first = finetune(b, TeacherLogits(teacher, ids), ids, cfg, checkpoint_dir=tmp_path,
                     progress=False, stop_at=4)
    assert (tmp_path / RESUME_TENSORS).is_file() and len(first.losses) == 4
    c, _, _ = setup(llama_dir, rep)  # a fresh process would start from the checkpoint
    resumed = finetune(c, TeacherLogits(teacher, ids), ids, cfg, checkpoint_dir=tmp_path,
                       progress=False)
    assert len(resumed.losses) == 6
    for (ka, va), (kc, vc) in zip(a.state_dict().items(), c.state_dict().items(), strict=True):
        assert ka == kc and torch.equal(va, vc), ka
    raw = (tmp_path / RESUME_TENSORS).read_bytes()
    assert raw[8:9] == b"{"  # a safetensors header, not a pickle


def test_resume_with_other_settings_is_a_clear_error(llama_dir, tmp_path):
    cfg = FinetuneConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, schedule="cosine",
                         vstep=VStepConfig(strategy="subspace_v_ste"))
    student, teacher, ids = setup(llama_dir, UniformConfig(bits=2, group_size=16))
    finetune(student, TeacherLogits(teacher, ids), ids, cfg, checkpoint_dir=tmp_path,
             progress=False, stop_at=2)
    other = FinetuneConfig(steps=4, batch_size=2, lr=2e-3, checkpoint_every=2,
                           schedule="cosine", vstep=VStepConfig(strategy="subspace_v_ste"))
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.001 -> 0.002\)"):
        finetune(student, TeacherLogits(teacher, ids), ids, other, checkpoint_dir=tmp_path,
                 progress=False)
    # evaluation and checkpoint cadence do not change the trajectory: resuming is fine
    same = FinetuneConfig(steps=4, batch_size=2, lr=1e-3, checkpoint_every=1, eval_every=0,
                          schedule="cosine", vstep=VStepConfig(strategy="subspace_v_ste"))
    resumed = finetune(student, TeacherLogits(teacher, ids), ids, same,
                       checkpoint_dir=tmp_path, progress=False)
    assert len(resumed.losses) == 4


def test_teacher_cache_matches_on_the_fly(llama_dir, tmp_path):
    _, teacher, ids = setup(llama_dir, UniformConfig(bits=4, group_size=16))
    live = TeacherLogits(teacher, ids)(torch.tensor([1, 3]))
    cached = TeacherLogits(teacher, ids, tmp_path)
    first = cached(torch.tensor([1, 3]))
    again = cached(torch.tensor([1, 3]))
    assert torch.equal(first, again)
    torch.testing.assert_close(first, live, atol=2e-2, rtol=1e-2)  # float16 on disk
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_cli_finetune(llama_dir, text_file, tmp_path, capsys):
    from pvtune.cli import main

    ckpt = tmp_path / "c"
    assert main(["compress", str(llama_dir), "--method", "rtn", "--bits", "2",
                 "--group-size", "16", "--calib-text", str(text_file), "--no-eval",
                 "--num-seqs", "2", "--seq-len", "16", "--output", str(ckpt),
                 "--max-new-tokens", "2"]) == 0
    out = tmp_path / "f"
    assert main(["finetune", str(ckpt), "--teacher", str(llama_dir), "--steps", "3",
                 "--num-seqs", "4", "--seq-len", "16", "--calib-text", str(text_file),
                 "--eval-text", str(text_file), "--eval-window", "16", "--output", str(out),
                 "--checkpoint-every", "2"]) == 0
    printed = capsys.readouterr().out
    assert "best perplexity" in printed and "discrete step time" in printed
    assert main(["eval", str(out), "--eval-text", str(text_file), "--eval-window", "16",
                 "--max-new-tokens", "2"]) == 0
