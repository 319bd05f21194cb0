"""Question: how close does PV-Tuning (subspace linearized V + STE) through the user's
command bring AQLM 2x8g8 SmolLM2-135M to the reference model's perplexity on the whole evaluation
split (default budget: 30 steps of 2 x 256 tokens, 200 calibration sequences, teacher on the
fly, continuous lr 3e-4 with cosine decay; raise --steps for a longer run)?

It runs the user's command, `pvtune finetune` on the 'standard' AQLM 2x8g8 checkpoint kept by
compress_methods.py, then evaluates the fine-tuned model on the whole evaluation split (117
windows of 512 tokens), next to the reference model (SmolLM2-135M-Instruct's Q4_1 GGUF
dequantized to fp32) and the starting checkpoint, measured in the same run.

    python benchmarks/pv_long_run.py              # fine-tune (about 10 min here) + evaluate
    python benchmarks/pv_long_run.py --reuse      # evaluate an existing run's output
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORK = Path(__file__).resolve().parent / ".work"
START = WORK / "compress-aqlm-2x8g8"
OUTPUT = WORK / "pv-long-aqlm"


def finetune_command(args) -> list[str]:
    """The `pvtune finetune` command line this benchmark measures."""
    return ["pvtune", "finetune", str(START), "--strategy", args.strategy, "--steps",
            str(args.steps), "--num-seqs", str(args.num_seqs), "--seq-len", "256",
            "--batch-size", "2", "--lr", str(args.lr), "--schedule", "cosine",
            "--eval-windows", "24", "--eval-every", "50", "--checkpoint-every", "50",
            "--output", str(OUTPUT), "--overwrite"]


def evaluate_all() -> dict[str, float]:
    """Perplexity on the whole split of the reference model, the starting checkpoint and the
    fine-tuned model, all measured here on the same windows."""
    from pvtune.llm.data import EvalConfig, default_texts, eval_windows, tokenize_stream
    from pvtune.llm.evaluate import perplexity
    from pvtune.llm.model import load_causal_lm

    out = {}
    for name, source in (("reference", None), ("start", START), ("finetuned", OUTPUT)):
        model, tok = load_causal_lm(source)
        windows = eval_windows(tokenize_stream(tok, default_texts("evaluation")),
                               EvalConfig(window=512))
        out[name] = perplexity(model, windows, progress=False).perplexity
    print(out, flush=True)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(result["losses"])
    a.set_xlabel("step")
    a.set_ylabel("KL(teacher || student), per batch")
    a.set_yscale("log")
    steps, ppl = zip(*result["evals"], strict=True) if result["evals"] else ((), ())
    b.plot(steps, ppl, marker="o")
    b.set_xlabel("step")
    b.set_ylabel("perplexity, 24 evaluation windows")
    fig.suptitle("PV-Tuning (subspace V + STE), AQLM 2x8g8 SmolLM2-135M")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reuse", action="store_true", help="evaluate an existing run")
    parser.add_argument("--strategy", default="subspace_v_ste")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--num-seqs", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    command = finetune_command(args)
    minutes = None
    if not args.reuse:
        shutil.rmtree(OUTPUT, ignore_errors=True)  # a fresh run, not a resume of the last one
        start = time.perf_counter()
        subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]],
                       check=True)
        minutes = (time.perf_counter() - start) / 60
    meta = json.loads((OUTPUT / "pvtune_meta.json").read_text())
    result = meta["finetune_result"]
    ppl = evaluate_all()

    from common import RESULTS, stamped, write_results

    ref = ppl["reference"]
    rows = [stamped(r) for r in (
        {"model": "reference", "perplexity": ref, "ratio_to_reference": 1.0},
        {"model": "aqlm 2x8g8, calibration only", "perplexity": ppl["start"],
         "ratio_to_reference": ppl["start"] / ref},
        {"model": f"aqlm 2x8g8 + {args.strategy}, {len(result['losses'])} steps",
         "perplexity": ppl["finetuned"], "ratio_to_reference": ppl["finetuned"] / ref,
         "losses": result["losses"], "evals": result["evals"],
         "fraction_changed": result["fraction_changed"], "minutes": minutes})]
    evals = ", ".join(f"{s}: {p:.2f}" for s, p in result["evals"])
    write_results(
        "pv_long_run", __doc__.split("\n\n")[0].removeprefix("Question: "), rows,
        ["model", "perplexity", "ratio_to_reference"], key=["model"],
        notes=f"Command: `{' '.join(command)}`. Whole evaluation split (117 windows of 512 "
              f"tokens). Perplexity on 24 windows during the run (step: ppl): {evals}; the "
              f"checkpoint is the best of those. Fine-tuning wall time: "
              f"{'not measured (--reuse)' if minutes is None else f'{minutes:.1f} min'}; "
              f"discrete step {result['seconds_discrete']:.0f} s vs forward+backward "
              f"{result['seconds_forward_backward']:.0f} s in total. reference: "
              "SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to fp32.")
    plot(result, RESULTS / "pv_long_run.png")


if __name__ == "__main__":
    main()
