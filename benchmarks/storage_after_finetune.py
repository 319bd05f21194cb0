"""Question: does a fine-tuned checkpoint store what it reports? Its bytes on disk and bits
per parameter against the compressed checkpoint it started from, after `pvtune finetune`.

Compresses SmolLM2-135M to 2-bit GPTQ (g64), fine-tunes it with PV-Tuning through the
command line, and compares the two checkpoints as saved: size of the tensor file, stored
bits (from the bytes written), and every tensor's dtype. Before float16 storage was kept
through fine-tuning, a fine-tuned AQLM checkpoint grew from 85 to 144 MB while its record
still said 2.153 bits (reported in issue 11, not re-measured here).

    python benchmarks/storage_after_finetune.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import stamped, write_results  # noqa: E402

WORK = Path(__file__).resolve().parent / ".work"


def describe(name: str, directory: Path) -> dict:
    from collections import Counter

    from safetensors import safe_open

    from pvtune.checkpoint.format import read_layout, weights_path
    from pvtune.llm.checkpoint import read_meta

    meta = read_meta(directory)
    path = weights_path(directory, read_layout(directory))
    with safe_open(str(path), "pt") as fh:
        dtypes = Counter(str(fh.get_slice(k).get_dtype()) for k in fh.keys())
    evals = meta.get("finetune_result", {}).get("evals") or []
    return {"checkpoint": name, "tensor_file_mib": path.stat().st_size / 2**20,
            "linear_bits": meta["bits"]["linear_bits_per_param"],
            "overall_bits": meta["bits"]["overall_bits_per_param"],
            "stored_dtypes": ", ".join(f"{k}: {v}" for k, v in sorted(dtypes.items())),
            "perplexity_start": evals[0][1] if evals else None,
            "perplexity_best": meta.get("finetune_result", {}).get("best_perplexity")}


def main() -> None:
    from pvtune.cli import main as pvtune

    # the same starting checkpoint as finetune_strategies.py's 2-bit rows (made once)
    start, tuned = WORK / "start-gptq2", WORK / "storage-gptq2-finetuned"
    if not (start / "pvtune_layout.json").is_file():
        assert pvtune(["compress", "--method", "gptq", "--bits", "2", "--group-size", "64",
                       "--no-eval", "--max-new-tokens", "0", "--output", str(start),
                       "--overwrite"]) == 0
    assert pvtune(["finetune", str(start), "--steps", "10", "--eval-windows", "16",
                   "--output", str(tuned), "--overwrite"]) == 0
    rows = [stamped(describe("gptq 2-bit g64, compressed", start)),
            stamped(describe("after 10 steps of pvtune finetune", tuned))]
    for row in rows:
        print(row, flush=True)
    write_results(
        "storage_after_finetune", __doc__.split("\n\n")[0].removeprefix("Question: "), rows,
        ["checkpoint", "tensor_file_mib", "linear_bits", "overall_bits", "stored_dtypes",
         "perplexity_start", "perplexity_best"], key=["checkpoint"],
        notes="Fine-tuning: subspace_v_ste, 10 steps of 2 x 256 tokens, 128 calibration "
              "sequences, perplexity on 16 evaluation windows of 512 tokens (step 0 is the "
              "compressed model). Bits are computed from the bytes each checkpoint stores.",
    )


if __name__ == "__main__":
    main()
