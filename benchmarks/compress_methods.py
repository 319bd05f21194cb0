"""Question: on SmolLM2-135M, how do RTN, GPTQ and AQLM trade bits per parameter against
evaluation perplexity, wall time and peak memory?

Runs the reference (the offline default model: SmolLM2-135M-Instruct's Q4_1 GGUF dequantized
to fp32, so a 4-bit result against it flatters); RTN and GPTQ at 4, 3, 2 bits (asymmetric,
group 64); AQLM 2x8g8 and 1x8g8 (the
'standard' preset: 32 calibration sequences of 512 tokens, two AQLM rounds, block
fine-tuning). Each run is a separate process (so peak memory is its own); perplexity is on
the whole evaluation split of the offline Wikipedia text (512-token windows).

    python benchmarks/compress_methods.py                 # everything (about 2 hours here)
    python benchmarks/compress_methods.py --runs reference gptq-2 --eval-windows 16
    # rows measured at another commit are dropped unless carried (and marked): --carry rtn-4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORK = Path(__file__).resolve().parent / ".work"
RUNS = {
    "reference": None,
    "rtn-4": ("rtn", 4), "rtn-3": ("rtn", 3), "rtn-2": ("rtn", 2),
    "gptq-4": ("gptq", 4), "gptq-3": ("gptq", 3), "gptq-2": ("gptq", 2),
    "aqlm-2x8g8": ("aqlm", "2x8g8"), "aqlm-1x8g8": ("aqlm", "1x8g8"),
}


def single(name: str, eval_windows: int | None, out: Path) -> None:
    """One run in this process; writes a JSON row to ``out``."""
    import torch
    from common import peak_rss_gib, stamped

    from pvtune.init import GPTQConfig, RTNConfig
    from pvtune.llm.checkpoint import bits_report, save_compressed
    from pvtune.llm.data import (
        EvalConfig,
        calibration_batch,
        default_texts,
        tokenize_stream,
    )
    from pvtune.llm.data import (
        eval_windows as make_windows,
    )
    from pvtune.llm.evaluate import perplexity
    from pvtune.llm.model import load_causal_lm
    from pvtune.llm.pipeline import CompressConfig, compress_model
    from pvtune.llm.recipes import PRESETS
    from pvtune.reprs import AQLMConfig, UniformConfig

    torch.manual_seed(0)
    preset = PRESETS["standard"]
    model, tok = load_causal_lm(None)
    windows = make_windows(tokenize_stream(tok, default_texts("evaluation")),
                           EvalConfig(max_windows=eval_windows))
    row = {"run": name, "method": name.split("-")[0]}
    seconds = 0.0
    if RUNS[name] is not None:
        method, arg = RUNS[name]
        if method == "aqlm":
            config = CompressConfig(method="aqlm", representation=AQLMConfig.preset(arg),
                                    method_config=preset.aqlm, calibration=preset.calibration,
                                    block_finetune=preset.block_finetune)
        else:
            config = CompressConfig(method=method, representation=UniformConfig(bits=arg),
                                    method_config=GPTQConfig() if method == "gptq"
                                    else RTNConfig(), calibration=preset.calibration)
        ids = calibration_batch(tokenize_stream(tok, default_texts("calibration")),
                                config.calibration)
        start = time.perf_counter()
        compress_model(model, ids, config)
        seconds = time.perf_counter() - start
        bits = bits_report(model)
        row.update(linear_bits=bits["linear_bits_per_param"],
                   overall_bits=bits["overall_bits_per_param"])
        # keep the checkpoint: benchmarks/finetune_strategies.py starts from these
        save_compressed(model, tok, WORK / f"compress-{name}", {"compress_config": str(config)})
    else:
        row.update(linear_bits=32.0, overall_bits=32.0)
    result = perplexity(model, windows)
    row.update(perplexity=result.perplexity, eval_tokens=result.tokens,
               compress_minutes=seconds / 60, peak_rss_gib=peak_rss_gib(),
               eval_tokens_per_s=result.tokens_per_second)
    out.write_text(json.dumps(stamped(row)))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    reference = next((r for r in rows if r["run"] == "reference"), None)
    for method, marker in (("rtn", "s"), ("gptq", "o"), ("aqlm", "^")):
        pts = sorted((r["linear_bits"], r["perplexity"], r["run"]) for r in rows
                     if r["method"] == method)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=method)
            for b, p, n in pts:
                ax.annotate(n, (b, p), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if reference:
        ax.axhline(reference["perplexity"], color="gray", ls="--",
                   label="reference (Q4_1 GGUF dequantized to fp32)")
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter (compressed linear layers)")
    ax.set_ylabel("evaluation perplexity (log)")
    ax.set_title("SmolLM2-135M: bits vs perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def ratios_to_reference(rows: list[dict]) -> None:
    """Each row's perplexity over the reference row's (None without a reference row)."""
    reference = next((r["perplexity"] for r in rows if r["run"] == "reference"), None)
    for r in rows:
        r["ppl_ratio_vs_reference"] = r["perplexity"] / reference if reference else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", choices=list(RUNS), default=list(RUNS),
                        help="runs to (re)measure; none: only rebuild the table and plot")
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--note", default="", help="free text added to the results table")
    parser.add_argument("--carry", nargs="*", default=[], choices=list(RUNS),
                        help="runs measured at other commits to keep, marked carried over")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        single(args.single, args.eval_windows, Path(args.out))
        return
    from common import COMMAND_ENV, RESULTS, command_line, write_results

    WORK.mkdir(exist_ok=True)
    env = {**os.environ, COMMAND_ENV: command_line()}
    rows = []
    for name in args.runs:  # each run in its own process: its own peak memory
        out = WORK / f"compress-row-{name}.json"
        cmd = [sys.executable, __file__, "--single", name, "--out", str(out)]
        if args.eval_windows:
            cmd += ["--eval-windows", str(args.eval_windows)]
        print(f"== {name}", flush=True)
        subprocess.run(cmd, check=True, env=env)
        rows.append(json.loads(out.read_text()))
        print(rows[-1], flush=True)
    merged = write_results(
        "compress_methods", __doc__.split("\n\n")[0].removeprefix("Question: "), rows,
        ["run", "linear_bits", "overall_bits", "perplexity", "ppl_ratio_vs_reference",
         "compress_minutes", "peak_rss_gib", "eval_tokens"], key=["run"],
        carry=[(name,) for name in args.carry], derive=ratios_to_reference,
        notes="linear_bits: stored bits/param of the compressed linear layers; overall_bits: "
              "whole model, embeddings (tied head) stored as float16. reference: "
              "SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to fp32. Perplexity on the "
              "evaluation split (every 10th article of the offline Wikipedia text). "
              "ppl_ratio_vs_reference uses the reference row of the same table. " + args.note,
    )
    plot(merged, RESULTS / "compress_methods.png")


if __name__ == "__main__":
    main()
