"""One-off migration (run once, kept to show how it was done): results files written before
rows carried their own provenance get per-row provenance reconstructed from git history.

Such a file was rebuilt from row files of several runs, so each row is only known to have
been measured at or before the commit that last wrote the file. The model called "fp32" there
is renamed "reference" (it is SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to fp32), and
ratio columns follow. Each row is stamped with
that commit and its date, the load average the file recorded when it was written, the
script it came from, and ``reconstructed: true``; every row is marked carried over, so
tables show them as such until a new run at one commit replaces them.

    python benchmarks/migrate_legacy_results.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, render_markdown  # noqa: E402

SCRIPTS = {"compress_methods": "compress_methods.py", "cuda_paths_cuda": "cuda_paths.py",
           "discrete_step_cost": "discrete_step_cost.py",
           "finetune_code_lr": "finetune_strategies.py --results finetune_code_lr",
           "finetune_long": "finetune_strategies.py --results finetune_long",
           "finetune_seeds": "finetune_strategies.py --results finetune_seeds",
           "finetune_strategies": "finetune_strategies.py", "pv_long_run": "pv_long_run.py"}
KEYS = {"compress_methods": ["run"], "cuda_paths_cuda": ["representation", "strategy"],
        "discrete_step_cost": ["batch", "representation", "strategy"],
        "pv_long_run": ["model"]}
COLUMNS = {
    "compress_methods": ["run", "linear_bits", "overall_bits", "perplexity",
                         "ppl_ratio_vs_reference", "compress_minutes", "peak_rss_gib"],
    "cuda_paths_cuda": ["representation", "strategy", "codes_equal", "max_rel_loss_diff",
                        "round_trip_exact", "status"],
    "discrete_step_cost": ["batch", "representation", "strategy", "forward_backward_s",
                           "discrete_step_s", "ratio"],
    "pv_long_run": ["model", "perplexity", "ratio_to_reference"],
}
FINETUNE_COLUMNS = ["representation", "strategy", "linear_bits", "perplexity", "steps", "lr"]


def last_commit(path: Path) -> tuple[str, str]:
    out = subprocess.run(["git", "log", "-1", "--format=%h %cI", "--", str(path)], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return out[0], out[1]


def _old_notes(markdown: Path) -> str:
    """The notes a legacy table carried between the table and its machine line."""
    if not markdown.is_file():
        return ""
    lines = markdown.read_text().splitlines()
    table_end = max((i for i, line in enumerate(lines) if line.startswith("|")), default=-1)
    notes = []
    for line in lines[table_end + 1:]:
        if line.startswith("Machine:"):
            break
        notes.append(line)
    return "\n".join(notes).strip()


def migrate(name: str) -> None:
    path = RESULTS / f"{name}.json"
    record = json.loads(path.read_text())
    if "machine" not in record:
        return  # already migrated
    commit, date = last_commit(path)
    machine = record.pop("machine")
    for row in record["rows"]:
        if "provenance" in row:
            continue
        for field in ("run", "model"):
            if row.get(field) == "fp32":
                row[field] = "reference"
        for old, new in (("ppl_ratio_vs_fp32", "ppl_ratio_vs_reference"),
                         ("ratio_to_fp32", "ratio_to_reference")):
            if old in row:
                row[new] = row.pop(old)
        row["provenance"] = {
            "commit": commit, "dirty": False, "utc": date, "reconstructed": True,
            "load_1m": machine["loadavg_1m"], "load_5m": machine["loadavg_5m"],
            "load_15m": machine["loadavg_15m"], "cpu_count": machine["cpu_count"],
            "torch": machine["torch"], "torch_threads": machine["torch_threads"],
            "python": machine["python"],
            "command": f"python benchmarks/{SCRIPTS[name]} (options not recorded; measured "
                       f"at or before {commit})",
        }
        row["carried_over"] = True
    record["key"] = KEYS.get(name, ["representation", "strategy"])
    steps = " They were measured with the code step in weight units, before it became " \
        "relative to each weight's grid step or row scale." if "finetune" in name or \
        "discrete" in name or "pv_long" in name else ""
    record.setdefault("notes", _old_notes(RESULTS / f"{name}.md") + "\n\nLegacy rows: "
                      "provenance reconstructed from git history by "
                      f"benchmarks/migrate_legacy_results.py.{steps}")
    path.write_text(json.dumps(record, indent=1) + "\n")
    columns = COLUMNS.get(name, FINETUNE_COLUMNS + (["seed"] if name == "finetune_seeds" else []))
    for field in ("notes", "question"):
        record[field] = record[field].replace("FP32", "reference (Q4_1 GGUF dequantized to "
                                              "fp32)").replace("fp32 ", "reference ")
    path.write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(render_markdown(name, record, columns))


if __name__ == "__main__":
    for result in SCRIPTS:
        if (RESULTS / f"{result}.json").is_file():
            migrate(result)
