"""Shared helpers for benchmark scripts: result records with machine facts, tables, plots."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

from pvtune.report import format_table, machine_info

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far, in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_results(name: str, question: str, rows: list[dict[str, Any]], columns: list[str],
                  notes: str = "", extra: dict[str, Any] | None = None) -> Path:
    """Write ``results/NAME.json`` and ``results/NAME.md`` (with the machine's load, torch
    version and thread count) and return the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"question": question, "machine": machine_info(), "rows": rows, **(extra or {})}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=1))
    m = record["machine"]
    table = format_table(columns, [[_fmt(r.get(c, "")) for c in columns] for r in rows])
    md = (f"# {name}\n\n**Question:** {question}\n\n{table}\n\n{notes}\n\n"
          f"Machine: {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
          f"load average {m['loadavg_1m']} / {m['loadavg_5m']} / {m['loadavg_15m']} "
          f"(1/5/15 min) when written.\n")
    (RESULTS / f"{name}.md").write_text(md)
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)
