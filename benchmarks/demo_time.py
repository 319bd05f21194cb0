"""Question: what does the README's main job (`make demo`) take and report on this machine,
from a clean clone of the committed tree with an empty pvtune cache?

Clones the current commit into a temporary folder, points PVTUNE_CACHE at an empty folder
there (so the default model and text are downloaded and prepared as a new user's would be)
and runs `make demo`: virtual environment and install, then `pvtune compress --target-size
60MiB --preset demo --chat-data 16`, `pvtune finetune` (20 PV-Tuning steps), `pvtune export
--to gguf` and `pvtune ask --limit 6`. Records the wall time of the whole command and of the
compression step, and the figures the demo prints (perplexity of the reference, the
compressed and the PV-tuned model; the GGUF file's size and bits; correct answers of the
model and of the reference).

    python benchmarks/demo_time.py                # clean clone, empty cache (about 20 min)
    python benchmarks/demo_time.py --warm-cache   # reuse ~/.cache/pvtune (no downloads)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, stamped, write_results  # noqa: E402

SUMMARY = {
    "perplexity_reference": r"perplexity, reference\s+\|\s+([0-9.]+)",
    "perplexity_compressed": r"perplexity, compressed\s+\|\s+([0-9.]+)",
    "perplexity_pv_tuned": r"perplexity, start -> best\s+\|\s+[0-9.]+ -> ([0-9.]+)",
    "linear_bits": r"bits/param \(decoder linears\)\s+\|\s+([0-9.]+)",
    "gguf_bits": r"bits/param \(whole file\)\s+\|\s+([0-9.]+)",
    "gguf_mib": r"\| size\s+\|\s+([0-9.]+) MiB",
    "compress_minutes": r"compression time\s+\|\s+([0-9.]+) min",
    "answers_correct": r"correct answers: ([0-9]+) of",
    "answers_reference": r"the reference \(.*?\): ([0-9]+) of",
    "questions": r"correct answers: [0-9]+ of ([0-9]+)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm-cache", action="store_true",
                        help="use the user's pvtune cache instead of an empty one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "pvtune"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
        env = dict(os.environ)
        if not args.warm_cache:
            env["PVTUNE_CACHE"] = str(Path(tmp) / "cache")
        start = time.perf_counter()
        proc = subprocess.run(["make", "demo"], cwd=clone, env=env, capture_output=True,
                              text=True)
        minutes = (time.perf_counter() - start) / 60
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
        if proc.returncode != 0:
            sys.exit(f"make demo failed with exit code {proc.returncode}")
    row = {"job": "make demo", "cache": "warm" if args.warm_cache else "empty",
           "total_minutes": minutes}
    for field, pattern in SUMMARY.items():
        match = re.search(pattern, proc.stdout)
        row[field] = float(match.group(1)) if match else None
    row = stamped(row)
    row["provenance"]["dirty"] = False  # measured on a fresh clone of that commit
    print(row, flush=True)
    write_results(
        "demo_time", __doc__.split("\n\n")[0].removeprefix("Question: "), [row],
        ["job", "cache", "total_minutes", "compress_minutes", "perplexity_reference",
         "perplexity_compressed", "perplexity_pv_tuned", "linear_bits", "gguf_bits",
         "gguf_mib", "answers_correct", "answers_reference", "questions"],
        key=["job", "cache"],
        notes="total_minutes: the whole `make demo` from a fresh clone (venv, install, "
              "downloads and preparation when the cache is empty, compression, fine-tuning, "
              "evaluations, export, questions). The reference is SmolLM2-135M-Instruct's Q4_1 "
              "GGUF dequantized to fp32; perplexity by pvtune on the demo's 16 evaluation "
              "windows of 512 tokens; gguf_bits: the GGUF file's bytes over all parameters "
              "(embeddings included); linear_bits: the decoder linears' tensor bytes over "
              "their weights; answers: `pvtune ask --limit 6` (the first 6 questions of "
              "pvtune.llm.questions), the model's and the reference's correct answers. "
              "Rows of an older demo are carried over only where marked.",
    )


if __name__ == "__main__":
    main()
