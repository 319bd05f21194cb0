"""Studies and the train/study commands, on the offline digits data."""

from __future__ import annotations

import json

import pytest

from pvtune import cli
from pvtune.errors import ConfigError
from pvtune.qat import QATConfig
from pvtune.vision import PVMethod
from pvtune.vision.studies import STUDIES, Arm, Study, method_for, run_study
from pvtune.vision.train import TrainConfig

pytest.importorskip("sklearn")


def test_method_names():
    assert method_for("fp32") is None
    assert isinstance(method_for("binary", "reste", activations="sign"), QATConfig)
    assert isinstance(method_for("ternary", pv=True), PVMethod)
    with pytest.raises(ConfigError, match="unknown representation"):
        method_for("septenary")
    with pytest.raises(ConfigError, match="weights only"):
        method_for("binary", pv=True, activations="sign")
    with pytest.raises(ConfigError, match="does not apply"):
        method_for("2:4", "reste")


def test_every_study_arm_builds_what_it_names():
    for study in STUDIES.values():
        for arm in study.arms:
            config = arm.config(study.base, seed=3)
            assert config.seed == 3 and config.act == arm.act
            if arm.representation == "fp32":
                assert config.method is None
            elif arm.pv:
                assert isinstance(config.method, PVMethod)
            elif not arm.peer:
                assert isinstance(config.method, QATConfig)
                assert config.method.estimator.name == arm.estimator
                assert (config.method.activations is None) == (arm.activations == "none")


def test_study_writes_json_markdown_and_plot(tmp_path, monkeypatch):
    tiny = Study("tiny", "a smoke test", (Arm("fp32", "fp32"), Arm("bin", "binary", "reste")),
                 dataset="digits")
    monkeypatch.setitem(STUDIES, "tiny", tiny)
    record = run_study("tiny", tmp_path, seeds=2, epochs=1, progress=False,
                       command="pvtune study tiny")
    assert [a["label"] for a in record["arms"]] == ["fp32", "bin"]
    assert all(len(a["runs"]) == 2 for a in record["arms"])
    saved = json.loads((tmp_path / "study_tiny.json").read_text())
    assert saved["arms"][1]["bits_per_param"] == record["arms"][1]["bits_per_param"]
    md = (tmp_path / "study_tiny.md").read_text()
    assert "Reproduce: `pvtune study tiny`" in md and "| bin" in md
    assert (tmp_path / "study_tiny.png").stat().st_size > 1000


def test_cli_train_saves_a_loadable_frozen_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--dataset", "digits", "--representation", "ternary",
                     "--estimator", "lsq", "--epochs", "1", "--batch-size", "32",
                     "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "frozen model: test accuracy" in printed
    record = json.loads((out / "train_result.json").read_text())
    assert record["test_accuracy"] > 0.2

    import torch

    from pvtune import load_quantized
    from pvtune.vision import SmallCNN, accuracy, load_images

    model = load_quantized(SmallCNN(1, 8, 10, width=16), out)
    data = load_images("digits")
    assert accuracy(model, data.test_x, data.test_y) == pytest.approx(record["test_accuracy"])
    assert isinstance(model.conv1.qweight.codes, torch.Tensor)


def test_cli_refuses_bad_combinations(capsys):
    assert cli.main(["train", "--representation", "2:4", "--estimator", "reste"]) == 2
    assert "does not apply" in capsys.readouterr().err


def test_grouped_codebook_arms_train_with_pv_and_the_proximal_step(tmp_path, monkeypatch):
    arms = (Arm("JLCM PV", "jlcm2", pv=True),
            Arm("JLCM proximal", "jlcm2-quantiles", pv=True, strategy="proximal_v"))
    monkeypatch.setitem(STUDIES, "tiny-jlcm", Study(
        "tiny-jlcm", "smoke", arms, dataset="digits",
        base=TrainConfig(epochs=2, batch_size=32, lr=2e-3)))
    record = run_study("tiny-jlcm", tmp_path, seeds=1, progress=False,
                       command="pvtune study tiny-jlcm")
    for arm in record["arms"]:
        assert 2.0 < arm["bits_per_param"] < 2.6  # 2-bit indices plus codebooks and groups
        assert arm["runs"][0]["test_accuracy"] > 0.8  # chance is 0.1; fp32 reaches 0.98
