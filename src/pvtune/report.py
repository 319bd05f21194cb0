"""Plain-text and markdown tables for summaries, and machine facts for benchmark records."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], floatfmt: str = ".4g"
) -> str:
    """A GitHub-markdown table (also readable as plain text)."""

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(list(headers)), sep, *map(line, body)])


def machine_info() -> dict[str, Any]:
    """Load average, torch version and thread count: recorded with every benchmark result."""
    import torch

    load1, load5, load15 = os.getloadavg()
    return {
        "loadavg_1m": round(load1, 2),
        "loadavg_5m": round(load5, 2),
        "loadavg_15m": round(load15, 2),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def source_commit() -> dict[str, Any]:
    """The git commit of the pvtune source that runs (an editable install inside a clone) and
    whether its tracked code has uncommitted changes; ``unknown`` outside a clone."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short=12", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "."))
    return {"commit": commit or "unknown", "dirty": dirty if commit else None}
