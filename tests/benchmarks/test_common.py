"""Benchmark tables: rows from one commit, others only when carried over (and marked)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_common", Path(__file__).resolve().parents[2] / "benchmarks" / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def row(name, commit, value):
    return {"run": name, "value": value, "provenance": {"commit": commit, "utc": "t",
                                                        "load_1m": 1.0, "command": "c"}}


def test_rows_of_other_commits_are_dropped_unless_carried():
    old = [row("a", "old", 1), row("b", "old", 2), row("c", "new", 3)]
    new = [row("a", "new", 10)]
    merged = common.merge_rows(old, new, key=["run"])
    assert [(r["run"], r["value"]) for r in merged] == [("c", 3), ("a", 10)]
    carried = common.merge_rows(old, new, key=["run"], carry=[("b",)])
    assert [(r["run"], r.get("carried_over", False)) for r in carried] == \
        [("b", True), ("c", False), ("a", False)]


def test_a_carried_row_stays_marked_and_one_run_is_one_commit():
    old = [{**row("b", "old", 2), "carried_over": True}, row("c", "new", 3)]
    merged = common.merge_rows(old, [row("a", "new", 1)], key=["run"])
    assert [r["run"] for r in merged] == ["c", "a"]  # carried rows need carrying again
    with pytest.raises(ValueError, match="several commits"):
        common.merge_rows([], [row("a", "x", 1), row("b", "y", 2)], key=["run"])


def test_provenance_names_the_commit_time_load_and_command():
    prov = common.provenance()
    assert {"commit", "dirty", "utc", "load_1m", "torch_threads", "torch", "command"} <= \
        set(prov)
    assert prov["command"].startswith("python ")


def test_markdown_is_built_from_the_record(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    common.write_results("t", "q?", [row("a", "c1", 1.5)], ["run", "value"], key=["run"])
    md = (tmp_path / "t.md").read_text()
    assert "| a   | 1.5   | c1" in md and "`t.json`" in md
