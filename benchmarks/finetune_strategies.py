"""Question: at the same data, step budget and seed, which way of fine-tuning through the
discrete weights gives the lowest perplexity on SmolLM2-135M at about 2 bits: calibration
only, continuous only, STE, stochastic rounding, naive linearized V, subspace linearized V,
or subspace linearized V + STE (PV-Tuning)? And how does torchao's QAT compare?

Starting points (made once, cached under benchmarks/.work/): AQLM 2x8g8 (the 'standard'
compress preset) and 2-bit asymmetric uniform g64 by GPTQ. Every strategy then runs the same
steps on the same calibration sequences (teacher logits cached on disk, float16) and is
evaluated on the same evaluation windows. The peer: torchao 0.18 QAT (its STE fake
quantization, int2 symmetric g64 with a float32 scale per group, about 2.5 bits - the only
2-bit route it converts on CPU) from the FP32 model with the same loss, data, steps and
learning rate.

    python benchmarks/finetune_strategies.py                       # everything
    python benchmarks/finetune_strategies.py --reprs gptq2 --strategies ste subspace_v_ste
    # a step-size sweep or a longer budget goes to its own table (rows kept apart):
    python benchmarks/finetune_strategies.py --results finetune_code_lr --code-lr 1e-2 \
        --reprs gptq2 --strategies ste subspace_v_ste --no-peer
    python benchmarks/finetune_strategies.py --results finetune_seeds --seed 1 \
        --reprs aqlm2x8g8 --strategies frozen ste subspace_v_ste --no-peer
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

WORK = Path(__file__).resolve().parent / ".work"
BASE_LR = 1e-4  # continuous lr of the main table; other values are named in row files/keys
STARTS = {  # pvtune compress arguments of each starting point
    "aqlm2x8g8": ["--method", "aqlm", "--codebooks", "2x8g8"],
    "gptq2": ["--method", "gptq", "--bits", "2", "--group-size", "64"],
    "q2_0": ["--method", "gptq", "--format", "q2_0"],  # llama.cpp's Q2_0 blocks
    "gptq3": ["--method", "gptq", "--bits", "3", "--group-size", "64"],
    "vq2": ["--method", "aqlm", "--codebooks", "1x8g4"],  # one codebook: plain VQ
    "aqlm3x8g8": ["--method", "aqlm", "--codebooks", "3x8g8"],  # about 3 bits
    "vq3": ["--method", "aqlm", "--codebooks", "1x6g2"],  # 64 vectors of 2: 3 bits
    # JLCM's grouped codebooks: 8 row groups per matrix
    "jlcm2-moments": ["--method", "jlcm", "--bits", "2", "--row-groups", "8"],
    "jlcm2-quantiles": ["--method", "jlcm", "--bits", "2", "--row-groups", "8",
                        "--grouping", "quantiles"],
    "jlcm3-moments": ["--method", "jlcm", "--bits", "3", "--row-groups", "8"],
    "jlcm3-quantiles": ["--method", "jlcm", "--bits", "3", "--row-groups", "8",
                        "--grouping", "quantiles"],
    "jlcm2-moments-g64": ["--method", "jlcm", "--bits", "2", "--row-groups", "64"],
}
# strategies that apply to some representations only
ONLY_FOR = {"proximal_v": lambda rep: rep.startswith("jlcm")}
STRATEGIES = ["calibration_only", "frozen", "ste", "stochastic_rounding", "linearized_v",
              "subspace_v", "subspace_v_ste"]


def starting_point(name: str) -> Path:
    """Compress the starting checkpoint once (cached)."""
    from pvtune.cli import main

    out = WORK / f"start-{name}"
    if (out / "pvtune_layout.json").is_file():
        return out
    # the same settings as compress_methods.py's runs, whose checkpoints are kept
    kept = WORK / {"aqlm2x8g8": "compress-aqlm-2x8g8", "gptq2": "compress-gptq-2"}.get(name, "-")
    if (kept / "pvtune_layout.json").is_file():
        return kept
    args = ["compress", "--no-eval", "--output", str(out), "--overwrite"]
    args += STARTS[name]
    assert main(args) == 0
    return out


def calibration(tok, args):
    from pvtune.llm.data import CalibrationConfig, calibration_batch, default_texts, tokenize_stream

    return calibration_batch(tokenize_stream(tok, default_texts("calibration")),
                             CalibrationConfig(num_sequences=args.num_seqs,
                                               sequence_length=args.seq_len, seed=1))


def windows(tok, args, text: str | None = None, count: int | None = None):
    """Evaluation windows of ``text`` (None: the Wikipedia evaluation split)."""
    from pvtune.llm.data import EvalConfig, eval_windows, load_texts, tokenize_stream

    return eval_windows(tokenize_stream(tok, load_texts(text, "evaluation")),
                        EvalConfig(max_windows=count or args.eval_windows))


def run_pvtune(rep: str, strategy: str, args) -> dict:
    import torch

    from pvtune.llm.checkpoint import bits_report
    from pvtune.llm.evaluate import perplexity
    from pvtune.llm.finetune import FinetuneConfig, finetune
    from pvtune.llm.model import load_causal_lm, model_fingerprint
    from pvtune.llm.teacher_logits import TeacherLogits
    from pvtune.nn.quantize import quantized_layers
    from pvtune.optim import VStepConfig

    torch.manual_seed(args.seed)
    student, tok = load_causal_lm(starting_point(rep))
    teacher, _ = load_causal_lm(None)
    for p in teacher.parameters():
        p.requires_grad_(False)
    ids, evw = calibration(tok, args), windows(tok, args)
    row = {"representation": rep, "strategy": strategy,
           "linear_bits": bits_report(student)["linear_bits_per_param"]}
    if strategy == "calibration_only":
        row.update(perplexity=perplexity(student, evw, progress=False).perplexity, losses=[])
        return row
    vstep = VStepConfig(strategy=strategy, lr=args.code_lr, tau=args.tau, seed=args.seed)
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, vstep=vstep,
                         seed=args.seed, schedule=args.schedule)
    cache = WORK / "teacher-cache"  # entries keyed by teacher, BOS and tokens
    if args.eval_start:  # the start's perplexity in the same process (saves a run)
        row["start_perplexity"] = perplexity(student, evw, progress=False).perplexity
    if strategy != "frozen":  # the step the optimizer resolves for this representation
        first = next(iter(quantized_layers(student).values()))
        row["code_lr"] = vstep.for_weight(first.qweight).step_size
    start = time.perf_counter()
    result = finetune(student, TeacherLogits(teacher, ids, cache,
                                             fingerprint=model_fingerprint(None)), ids, cfg)
    unrelated = {}
    if args.unrelated_windows:
        unrelated["unrelated_perplexity"] = perplexity(
            student, windows(tok, args, "offline:moby-dick", args.unrelated_windows),
            progress=False).perplexity
    row.update(
        perplexity=perplexity(student, evw, progress=False).perplexity, **unrelated,
        losses=result.losses, fraction_changed=result.fraction_changed,
        minutes=(time.perf_counter() - start) / 60,
        discrete_over_fwd_bwd=result.seconds_discrete / result.seconds_forward_backward,
        fwd_bwd_s_per_step=result.seconds_forward_backward / len(result.losses),
        discrete_s_per_step=result.seconds_discrete / len(result.losses),
    )
    return row


def run_torchao(args) -> dict:
    """torchao QAT peer: fake-quantized int2 g64 weights trained with STE, then converted."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    from pvtune.llm.evaluate import perplexity
    from pvtune.llm.finetune import FinetuneConfig, batch_indices, kl_loss
    from pvtune.llm.model import find_blocks, load_causal_lm, model_fingerprint
    from pvtune.llm.teacher_logits import TeacherLogits

    torch.manual_seed(0)
    model, tok = load_causal_lm(None)
    teacher, _ = load_causal_lm(None)
    for p in teacher.parameters():
        p.requires_grad_(False)
    ids, evw = calibration(tok, args), windows(tok, args)
    blocks = find_blocks(model).path
    base = IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerGroup(64))
    in_blocks = lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith(blocks + ".")  # noqa: E731
    quantize_(model, QATConfig(base, step="prepare"), filter_fn=in_blocks)
    cfg = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                           betas=cfg.betas)
    teacher_logits = TeacherLogits(teacher, ids, WORK / "teacher-cache",
                                   fingerprint=model_fingerprint(None))
    losses = []
    model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        index = batch_indices(cfg, step, 0, ids.shape[0])
        loss = kl_loss(model(input_ids=ids[index], use_cache=False).logits,
                       teacher_logits(index))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    model.eval()
    quantize_(model, QATConfig(base, step="convert"),
              filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))
    return {"representation": "torchao-int2-sym-g64", "strategy": "torchao_qat",
            "linear_bits": 2 + 32 / 64, "perplexity": perplexity(model, evw,
                                                                progress=False).perplexity,
            "losses": losses, "minutes": (time.perf_counter() - start) / 60}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reps = sorted({r["representation"] for r in rows if r.get("losses")})
    if not reps:
        return
    fig, axes = plt.subplots(1, len(reps), figsize=(6 * len(reps), 4), squeeze=False)
    for ax, rep in zip(axes[0], reps, strict=True):
        for r in rows:
            if r["representation"] == rep and r.get("losses"):
                code = f" code {r['code_lr']:g}" if r.get("code_lr") else ""
                ax.plot(r["losses"], label=f"{r['strategy']}{code} (ppl {r['perplexity']:.1f})")
        ax.set_title(rep)
        ax.set_xlabel("step")
        ax.set_ylabel("KL(teacher || student)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_single(rep: str, strategy: str, options: list[str]) -> dict:
    """One run of ``strategy`` from the start ``rep`` in its own process (``options``: this
    script's flags); its row."""
    from common import COMMAND_ENV, command_line

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        subprocess.run([sys.executable, __file__, "--single", rep, strategy, "--out", str(out),
                        *options], check=True, env={**os.environ, COMMAND_ENV: command_line()})
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description="fine-tuning strategies at ~2 bits")
    parser.add_argument("--reprs", nargs="+", default=["gptq2", "aqlm2x8g8"],
                        choices=sorted(STARTS))
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES)
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=BASE_LR)
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--schedule", default="constant",
                        choices=["constant", "cosine", "linear"])
    parser.add_argument("--unrelated-windows", type=int, default=0,
                        help="also evaluate on this many windows of offline:moby-dick")
    parser.add_argument("--code-lr", type=float, default=None,
                        help="relative discrete step size for every strategy run (default: "
                             "each strategy's, pvtune.optim.strategies.default_step_size)")
    parser.add_argument("--results", default="finetune_strategies",
                        help="results name: benchmarks/results/NAME.{json,md,png}; rows of "
                             "other names are kept apart from the main table's")
    parser.add_argument("--carry", nargs="*", default=[], metavar="REPR/STRATEGY",
                        help="rows measured at other commits to keep in the table, marked as "
                             "carried over (all others from other commits are dropped)")
    parser.add_argument("--num-seqs", type=int, default=80)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0,
                        help="order of the calibration batches and stochastic-rounding draws")
    parser.add_argument("--eval-start", action="store_true",
                        help="also evaluate each starting point before fine-tuning")
    parser.add_argument("--single", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from common import stamped

    if args.single:
        rep, strategy = args.single
        row = run_torchao(args) if strategy == "torchao_qat" else run_pvtune(rep, strategy, args)
        row.update(steps=args.steps, batch=f"{args.batch_size}x{args.seq_len}", lr=args.lr,
                   seed=args.seed, tau=args.tau, schedule=args.schedule)
        Path(args.out).write_text(json.dumps(stamped(row)))
        return
    WORK.mkdir(exist_ok=True)
    jobs = [(rep, s) for rep in args.reprs for s in args.strategies
            if ONLY_FOR.get(s, lambda r: True)(rep)]
    if not args.no_peer:
        jobs.append(("reference", "torchao_qat"))
    passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                   if k in ("steps", "batch_size", "lr", "tau", "num_seqs", "seq_len",
                            "eval_windows", "seed", "schedule", "unrelated_windows")
                   or (k == "code_lr" and v is not None)]
    passthrough += ["--eval-start"] if args.eval_start else []
    rows = []
    for rep, strategy in jobs:
        print(f"== {rep} {strategy}", flush=True)
        row = run_single(rep, strategy, passthrough)
        print({k: v for k, v in row.items() if k not in ("losses", "fraction_changed")},
              flush=True)
        rows.append(row)
        write_table(args, rows)  # after every run: a stopped benchmark keeps what it measured


# questions of the side tables (a sweep or a longer budget); the main table's is the docstring's
QUESTIONS = {
    "finetune_code_lr": "how does the code step size change the comparison: does a larger "
                        "step, where the dense strategies change many codes per step, favour "
                        "the subspace (top-tau) strategies over STE and naive linearized V?",
    "finetune_long": "does the comparison hold with a longer budget and the published "
                     "continuous learning rate (3e-4)?",
    "finetune_seeds": "how far do the rows move with the seed (the order of the calibration "
                      "batches), next to the gaps between strategies?",
    "jlcm_study": "at about 2 and 3 stored bits per weight, how do JLCM's grouped codebooks "
                  "(each grouping; PV-Tuning and the proximal mapping update) compare with "
                  "uniform GPTQ, Q2_0, AQLM and VQ before and after the same fine-tuning?",
}


KEY = ("representation", "strategy", "code_lr", "lr", "seed")


def write_table(args, rows: list[dict]) -> None:
    """Merge this run's rows into ``results/ARGS.RESULTS``; table and loss-curve plot."""
    from common import RESULTS, write_results

    from pvtune.optim.strategies import DEFAULT_LR

    carry = {tuple(c.split("/")) for c in args.carry}
    old = RESULTS / f"{args.results}.json"
    carried = [tuple(r.get(k) for k in KEY) for r in
               (json.loads(old.read_text())["rows"] if old.is_file() else [])
               if (r["representation"], r["strategy"]) in carry]
    columns = ["representation", "strategy", "seed", "linear_bits", "steps", "batch", "lr",
               "code_lr", "perplexity", "minutes", "discrete_over_fwd_bwd",
               "fwd_bwd_s_per_step", "discrete_s_per_step"]
    merged = write_results(
        args.results,
        QUESTIONS.get(args.results, __doc__.split("\n\n")[0].removeprefix("Question: ")), rows,
        columns, key=KEY, carry=carried,
        notes=f"Steps of batch (sequences x tokens) as listed; {args.num_seqs} calibration "
              f"sequences; lr: the continuous step size; tau {args.tau}; code_lr: the "
              f"relative discrete step size each row ran with, in units of each weight's grid "
              f"step or row scale (defaults {DEFAULT_LR}); perplexity on {args.eval_windows} "
              "evaluation windows of 512 tokens. minutes: fine-tuning wall time (teacher "
              "logits cached). Loss curves and code-change fractions per step are in the JSON.",
    )
    order = {s: i for i, s in enumerate([*STRATEGIES, "torchao_qat"])}
    merged.sort(key=lambda r: (r["representation"], order.get(r["strategy"], 99),
                               r.get("code_lr") or 0.0, r.get("seed", 0)))
    plot(merged, RESULTS / f"{args.results}.png")


if __name__ == "__main__":
    main()
