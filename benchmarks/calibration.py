"""How much calibration text does GPTQ need, with and without rotation? Perplexity after
``pvtune compress --target-size`` against the number of calibration sequences.

Each point is one command, as a user runs it (SmolLM2-135M-Instruct, the offline Wikipedia
calibration split, sequences of 512 tokens, GPTQ into the budget's GGUF block types, no
fine-tuning), evaluated by pvtune on the demo's 16 evaluation windows:

    pvtune compress --target-size 60MiB --preset demo --num-seqs N [--rotate hadamard] ...

    python benchmarks/calibration.py                         # 16 to 256 sequences
    python benchmarks/calibration.py --seqs 16,64 --rotations off

Rows already in ``results/calibration.json`` at the current commit are skipped (resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, provenance, stamped, write_results  # noqa: E402

NAME = "calibration"
COLUMNS = ["budget", "rotation", "sequences", "tokens", "perplexity", "ratio", "seconds"]


def _done(commit: str) -> set[tuple]:
    path = RESULTS / f"{NAME}.json"
    if not path.is_file():
        return set()
    return {(r["budget"], r["rotation"], r["sequences"])
            for r in json.loads(path.read_text())["rows"]
            if r.get("provenance", {}).get("commit") == commit and not r.get("carried_over")}


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads((RESULTS / f"{NAME}.json").read_text())["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for rot in ("none", "hadamard"):
        pts = sorted((r for r in rows if r["rotation"] == rot), key=lambda r: r["sequences"])
        if pts:
            ax.plot([r["sequences"] for r in pts], [r["perplexity"] for r in pts], "o-",
                    label=f"rotation: {rot}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("calibration sequences of 512 tokens")
    ax.set_ylabel("perplexity after GPTQ (pvtune)")
    ax.set_title(f"SmolLM2-135M, {rows[0]['budget'] if rows else ''} budget")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", default="16,32,64,128,256")
    parser.add_argument("--rotations", default="off,on")
    parser.add_argument("--budget", default="60MiB")
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args()
    done = _done(provenance()["commit"])
    pvtune = str(Path(sys.executable).with_name("pvtune"))
    for seqs in [int(s) for s in args.seqs.split(",") if s]:
        for rot in [r for r in args.rotations.split(",") if r]:
            rotation = "hadamard" if rot == "on" else "none"
            if (args.budget, rotation, seqs) in done:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "ckpt"
                cmd = [pvtune, "compress", "--target-size", args.budget, "--preset", "demo",
                       "--num-seqs", str(seqs), "--rotate", rotation, "--output", str(out),
                       "--eval-windows", str(args.eval_windows), "--max-new-tokens", "0"]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=os.environ.copy(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                seconds = time.perf_counter() - t0
                meta = json.loads((out / "pvtune_meta.json").read_text())
            ev = meta["evaluation"]
            row = {"budget": args.budget, "rotation": rotation, "sequences": seqs,
                   "tokens": seqs * 512, "perplexity": ev["compressed"]["perplexity"],
                   "ratio": ev["compressed"]["perplexity"] / ev["reference"]["perplexity"],
                   "reference": ev["reference"]["perplexity"], "seconds": seconds}
            path = RESULTS / f"{NAME}.json"
            carry = [(r["budget"], r["rotation"], r["sequences"])  # other commits' rows stay
                     for r in (json.loads(path.read_text())["rows"] if path.is_file() else [])]
            write_results(NAME, "How much calibration text does GPTQ need, with and without "
                          "rotation?", [stamped(row)], COLUMNS,
                          key=["budget", "rotation", "sequences"], carry=carry,
                          notes="SmolLM2-135M-Instruct (reference: its Q4_1 GGUF dequantized "
                                "to fp32); pvtune compress --target-size with GPTQ, no "
                                "fine-tuning; perplexity by pvtune on the demo's "
                                f"{args.eval_windows} windows; "
                                "seconds: the whole command (reference and compressed "
                                "evaluation included).")
            plot()


if __name__ == "__main__":
    main()
