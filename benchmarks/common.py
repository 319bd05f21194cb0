"""Shared helpers for benchmark scripts: rows with provenance, tables, plots.

Every result row carries its provenance (:func:`provenance`): the commit it was measured
at (and whether the tree had uncommitted changes), the UTC time, the load average, torch's
version and thread count, and the exact command. Results live in ``results/NAME.json``
(committed); :func:`write_results` merges a run's rows into it and rebuilds
``results/NAME.md`` from the JSON alone (never edit a table by hand). A table holds the rows
of one commit: rows measured at another commit stay only when the run names their keys in
``carry`` (they are then marked as carried over, with their own commit), else they are
dropped.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pvtune.report import format_table, machine_info

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
COMMAND_ENV = "PVTUNE_BENCH_COMMAND"  # a parent passes its own command to worker processes


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def command_line() -> str:
    """The command that produced this process's results, as typed from the repository root
    (a worker process reports its parent's command)."""
    if os.environ.get(COMMAND_ENV):
        return os.environ[COMMAND_ENV]
    argv = list(sys.argv)
    script = Path(argv[0]).resolve()
    if script.is_relative_to(ROOT):
        argv[0] = str(script.relative_to(ROOT))
    return "python " + shlex.join(argv)


def provenance() -> dict[str, Any]:
    """Where and when a row was measured: commit, dirty flag, UTC time, load average,
    threads, torch, command."""
    # uncommitted changes to tracked code (results files and new untracked files aside)
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "src",
                      "benchmarks", "pyproject.toml", ":(exclude)benchmarks/results"))
    m = machine_info()
    return {
        "commit": _git("rev-parse", "--short=12", "HEAD") or "unknown",
        "dirty": dirty,
        "utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_1m": m["loadavg_1m"], "load_5m": m["loadavg_5m"], "load_15m": m["loadavg_15m"],
        "cpu_count": m["cpu_count"], "torch": m["torch"], "torch_threads": m["torch_threads"],
        "python": platform.python_version(), "command": command_line(),
    }


def stamped(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its provenance (call when the row's measurement ends)."""
    return {**row, "provenance": provenance()}


def _key(row: dict[str, Any], key: Sequence[str]) -> tuple:
    return tuple(row.get(k) for k in key)


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]], key: Sequence[str],
               carry: Sequence[tuple] = ()) -> list[dict[str, Any]]:
    """The rows of a results table after a run: ``new`` rows replace old rows with the same
    key; old rows of the new rows' commit stay; old rows of another commit stay only when
    their key is in ``carry`` (marked ``carried_over``), else they are dropped."""
    commits = {r["provenance"]["commit"] for r in new}
    if len(commits) > 1:
        raise ValueError(f"one run's rows come from several commits: {sorted(commits)}")
    commit = next(iter(commits), None)
    replaced = {_key(r, key) for r in new}
    kept = []
    for row in old:
        k = _key(row, key)
        if k in replaced:
            continue
        same = commit is None or row.get("provenance", {}).get("commit") == commit
        if same and not row.get("carried_over"):
            kept.append(row)
        elif k in set(carry):
            kept.append({**row, "carried_over": True})
    return kept + list(new)


def write_results(name: str, question: str, rows: list[dict[str, Any]], columns: list[str],
                  key: Sequence[str], notes: str = "", carry: Sequence[tuple] = (),
                  extra: dict[str, Any] | None = None,
                  derive: Callable[[list[dict[str, Any]]], None] | None = None,
                  ) -> list[dict[str, Any]]:
    """Merge ``rows`` (each :func:`stamped`) into ``results/NAME.json`` (see
    :func:`merge_rows`), let ``derive`` fill columns computed across rows (ratios), rebuild
    ``results/NAME.md`` from the JSON and return the merged rows."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    merged = merge_rows(old, rows, key, carry)
    if derive is not None:
        derive(merged)
    record = {"question": question, "key": list(key), "notes": notes, "rows": merged,
              **(extra or {})}
    path.write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(render_markdown(name, record, columns))
    return merged


def render_markdown(name: str, record: dict[str, Any], columns: list[str]) -> str:
    """The markdown table of a results record: each row with its commit, time and load."""
    rows = record["rows"]
    body = []
    for r in rows:
        prov = r.get("provenance", {})
        mark = " (carried over)" if r.get("carried_over") else ""
        dirty = "+dirty" if prov.get("dirty") else ""
        body.append([_fmt(r.get(c, "")) for c in columns]
                    + [f"{prov.get('commit', '?')}{dirty}{mark}", prov.get("utc", "?"),
                       _fmt(prov.get("load_1m", ""))])
    table = format_table([*columns, "commit", "measured (UTC)", "load 1m"], body)
    commands = sorted({r.get("provenance", {}).get("command", "?") for r in rows})
    threads = sorted({str(r.get("provenance", {}).get("torch_threads", "?")) for r in rows})
    torch_versions = sorted({str(r.get("provenance", {}).get("torch", "?")) for r in rows})
    cmd_lines = "\n".join(f"    {c}" for c in commands)
    return (f"# {name}\n\n**Question:** {record['question']}\n\n{table}\n\n{record['notes']}\n\n"
            f"Rows come from one commit unless marked carried over. Machine: "
            f"{os.cpu_count()} CPUs, torch {', '.join(torch_versions)} with "
            f"{', '.join(threads)} threads; each row's full provenance (commit, time, load "
            f"average, threads, command) is in `{name}.json`. Commands:\n\n{cmd_lines}\n")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)
