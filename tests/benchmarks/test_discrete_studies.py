"""The discrete-choice studies run end to end (smoke settings, offline data) and write their
JSON, markdown and PNG with sane numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import common  # the benchmarks' helper module, as the scripts import it

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def _written(folder: Path, name: str) -> dict:
    for ext in ("json", "md", "png"):
        assert (folder / f"{name}.{ext}").is_file(), ext
    return json.loads((folder / f"{name}.json").read_text())


def test_vq_bottleneck_smoke(results):
    rows = _script("vq_bottleneck").main(["--smoke", "--dataset", "digits",
                                          "--arms", "plain", "ema", "rotation", "vqbridge"])
    record = _written(results, "vq_bottleneck")
    assert [r["method"] for r in record["rows"]] == ["plain", "ema", "rotation", "vqbridge"]
    for r in rows:
        assert 0 < r["usage_train"] <= 1 and 0 < r["test_mse"] < 1


def test_gumbel_guidance_smoke(results):
    rows = _script("gumbel_guidance").main(["--smoke"])
    _written(results, "gumbel_guidance")
    assert [r["arm"] for r in rows][0] == "unguided"
    for r in rows:
        assert 0 <= r["success"] <= 1 and 0 <= r["valid"] <= 1
    # the study's point, already at smoke scale (seeded): guidance lifts the rare class
    unguided = rows[0]["success"]
    assert all(r["success"] > 2 * unguided + 0.1 for r in rows[1:]), rows


def test_topn_budget_smoke(results):
    rows = _script("topn_budget").main(["--smoke"])
    _written(results, "topn_budget")
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["no selection"]["kept_fraction"] == 1.0
    assert by_arm["fixed 1/8"]["kept_fraction"] == pytest.approx(8 / 64)


def test_permutation_alignment_smoke(results):
    rows = _script("permutation_alignment").main(["--smoke", "--dataset", "digits"])
    record = _written(results, "permutation_alignment")
    cases = [r["case"] for r in rows]
    assert "pairs: weight matching" in cases and "merge 3: weight matching" in cases
    assert len(record["curves"]) == 9
