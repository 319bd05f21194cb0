"""Question: at about 2 and 3 stored bits per weight on SmolLM2-135M, how do JLCM's grouped
codebooks (rows grouped by moments or by quantiles; trained by PV-Tuning or by JLCM's
proximal mapping update) compare with uniform GPTQ, llama.cpp's Q2_0 blocks, AQLM and plain
VQ, before and after the same fine-tuning budget?

Every arm is one process of ``finetune_strategies.py --single`` from a cached starting point
(``benchmarks/.work/start-NAME``, made by ``pvtune compress`` with the arguments in
``finetune_strategies.STARTS``): it evaluates the start, fine-tunes it ``--steps`` steps of
2 x 256 tokens against the uncompressed model (KL, continuous lr 1e-4, code steps at their
defaults, the same never-repeated sequences for every arm) and evaluates again on the same
Wikipedia windows. Bits are those stored by the linear layers (``bits_report``).

The starting points are compressed once (``--prepare`` makes them all and records how long
each took; AQLM 2x8g8 and VQ 1x8g4 take about 17 minutes each here); the study itself,
from cached starts, is one command of about half an hour::

    python benchmarks/jlcm_study.py --prepare     # once: every starting point
    python benchmarks/jlcm_study.py               # the study (resumes; --remeasure redoes)
    python benchmarks/jlcm_study.py --strategies proximal_v   # only some arms

The paper's setting (Yvinec et al., ICLR 2024, arXiv 2309.17361): post-training compression
of ImageNet CNNs and of LLMs (a Llama 7B in 2 GB), codebooks and mappings learned jointly
from a grouping of similarly distributed neurons, no public code. Here: a 135M-parameter LLM,
8 row groups per matrix (64 in one arm) with their group stored per row, codes chosen by
GPTQ's error feedback onto the k-means levels and the levels refitted to them, a few
hundred fine-tuning steps at most on a Wikipedia sample, against other representations of
the same size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NAME = "jlcm_study"
# (starting point, discrete step, code step: None for the strategy's default); every start
# is evaluated before and after. The default code step (0.01 of the level spacing) lets the
# STE buffer travel at most a tenth of a level in 10 steps; the 0.1 arms let codes move.
ARMS = [("jlcm2-moments", "subspace_v_ste", None), ("jlcm2-moments", "proximal_v", None),
        ("jlcm2-quantiles", "subspace_v_ste", None), ("jlcm2-quantiles", "proximal_v", None),
        ("jlcm2-moments", "subspace_v_ste", 0.1), ("jlcm2-moments", "proximal_v", 0.1),
        ("jlcm2-moments-g64", "subspace_v_ste", None),
        ("gptq2", "subspace_v_ste", None), ("q2_0", "subspace_v_ste", None),
        ("aqlm2x8g8", "subspace_v_ste", None), ("vq2", "subspace_v_ste", None),
        ("jlcm3-moments", "subspace_v_ste", None), ("jlcm3-moments", "proximal_v", None),
        ("jlcm3-quantiles", "subspace_v_ste", None), ("jlcm3-quantiles", "proximal_v", None),
        ("jlcm3-moments", "subspace_v_ste", 0.1),
        ("jlcm3-moments", "proximal_v", 0.1), ("gptq3", "subspace_v_ste", None),
        ("vq3", "subspace_v_ste", None), ("aqlm3x8g8", "subspace_v_ste", None)]
KEY = ("representation", "strategy", "code_step")
COLUMNS = ["representation", "strategy", "code_step", "linear_bits", "start_perplexity",
           "perplexity", "gain", "steps", "minutes", "codes_changed"]


def prepare(only: list[str] | None) -> None:
    """Compress every starting point not yet cached (``only``: these); print how long each
    took."""
    from finetune_strategies import starting_point

    for rep in dict.fromkeys(rep for rep, _, _ in ARMS if not only or rep in only):
        t0 = time.perf_counter()
        path = starting_point(rep)
        print(f"{rep}: {path} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)


def run_arm(rep: str, strategy: str, code_step: float | None, args) -> dict:
    """One arm in its own process; its row."""
    from finetune_strategies import run_single

    row = run_single(rep, strategy, [
        f"--steps={args.steps}", "--batch-size=2", "--lr=1e-4", f"--num-seqs={2 * args.steps}",
        f"--eval-windows={args.eval_windows}", "--eval-start"]
        + ([f"--code-lr={code_step}"] if code_step is not None else []))
    row["code_step"] = code_step
    return row


def derive(rows: list[dict]) -> None:
    """The gain of each fine-tune (start over end) and its code changes."""
    for r in rows:
        if r.get("code_step") is None:  # the strategy's default: an empty cell
            r.pop("code_step", None)
        if r.get("start_perplexity") and r.get("perplexity"):
            r["gain"] = r["start_perplexity"] / r["perplexity"]
        if r.get("fraction_changed"):
            r["codes_changed"] = sum(r["fraction_changed"])


def record(row: dict | None, args) -> None:
    """Merge ``row`` into the results (None: rebuild them from the JSON) and plot."""
    from common import RESULTS, write_results

    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = write_results(
        NAME, __doc__.split("\n\n")[0].removeprefix("Question: "), [row] if row else [],
        COLUMNS, key=KEY, derive=derive, carry=[tuple(r.get(k) for k in KEY) for r in old],
        notes=(f"start_perplexity and perplexity: on {args.eval_windows} Wikipedia evaluation "
               f"windows of 512 tokens, before and after {args.steps} steps of 2 x 256 tokens "
               "(KL to the uncompressed model, continuous lr 1e-4, tau 0.01); code_step: the "
               "relative code step (empty: the strategy's default, 0.01 of the grid step or "
               "level spacing, 0.016 of AQLM's row scale); gain = start / end; "
               "codes_changed: share of code groups changed, summed over steps. "
               "linear_bits: stored bits per weight of the decoder linears. jlcmB-G: JLCM "
               "at B bits, 8 row groups per matrix grouped by G (-g64: 64 groups), codes "
               "by GPTQ's error feedback onto each row's levels, levels refitted once by "
               "least squares; gptqB: uniform asymmetric "
               "grid of group 64 by GPTQ; q2_0: llama.cpp's Q2_0 blocks by GPTQ; aqlm2x8g8: "
               "AQLM, two codebooks of 256 vectors of 8 (aqlm3x8g8: three); vq2: one "
               "codebook of 256 vectors of 4 (AQLM 1x8g4); vq3: one codebook of 64 vectors "
               "of 2 (AQLM 1x6g2). The paper's "
               "setting: see the script's docstring."))
    plot(rows, RESULTS / f"{NAME}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    off_scale = []  # arms that end far above every start: listed, not drawn
    top = 1.5 * max((r["start_perplexity"] for r in rows if r.get("start_perplexity")),
                  default=1.0)
    for r in rows:
        if not r.get("start_perplexity"):
            continue
        if r["perplexity"] > top:
            off_scale.append(f"{r['representation']} {r['strategy']} step "
                             f"{r.get('code_step') or 'default'}: {r['perplexity']:.3g}")
            continue
        x = r["linear_bits"]
        color = ("tab:red" if r["representation"].startswith("jlcm") else "tab:blue")
        marker = "s" if r["strategy"] == "proximal_v" else "o"
        ax.annotate("", (x, r["perplexity"]), (x, r["start_perplexity"]),
                    arrowprops={"arrowstyle": "->", "color": color, "lw": 0.7})
        ax.plot([x], [r["perplexity"]], marker, color=color, ms=5)
        label = r["representation"] + (" prox" if r["strategy"] == "proximal_v" else "") \
            + (f" step {r['code_step']:g}" if r.get("code_step") else "")
        ax.annotate(label, (x, r["perplexity"]), fontsize=6, xytext=(3, -8),
                    textcoords="offset points")
    ax.set_yscale("log")
    ax.set_ylim(top=top)  # every start and every drawn end inside the plot
    ax.set_xlabel("stored bits per weight (decoder linears)")
    ax.set_ylabel("perplexity (arrow: before -> after fine-tuning)")
    ax.set_title("SmolLM2-135M: JLCM (red; squares: proximal update) and other representations")
    ax.grid(True, which="both", alpha=0.3)
    if off_scale:
        ax.text(0.99, 0.98, "ends above the plot:\n" + "\n".join(off_scale),
                transform=ax.transAxes, ha="right", va="top", fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true",
                        help="compress every starting point that is not cached, then stop")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--reprs", nargs="+", help="only the arms of these starting points")
    parser.add_argument("--strategies", nargs="+", help="only the arms of these strategies")
    parser.add_argument("--code-step", type=float,
                        help="only the arms with this code step (default: every arm)")
    parser.add_argument("--remeasure", action="store_true",
                        help="run arms again that the table already holds")
    parser.add_argument("--rebuild", action="store_true",
                        help="only rebuild the table and plot from the JSON")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.reprs)
        return
    if args.rebuild:
        record(None, args)
        return
    from common import RESULTS, provenance

    path = RESULTS / f"{NAME}.json"
    commit = provenance()["commit"]
    done = set() if args.remeasure or not path.is_file() else {
        tuple(r.get(k) for k in KEY) for r in json.loads(path.read_text())["rows"]
        if r["provenance"]["commit"] == commit and not r.get("carried_over")}
    for rep, strategy, code_step in ARMS:
        if ((rep, strategy, code_step) in done or (args.reprs and rep not in args.reprs)
                or (args.strategies and strategy not in args.strategies)
                or (args.code_step is not None and code_step != args.code_step)):
            continue
        print(f"== {rep} {strategy} code step {code_step}", flush=True)
        row = run_arm(rep, strategy, code_step, args)
        record(row, args)
        print({k: v for k, v in row.items()
               if k not in ("losses", "fraction_changed", "provenance")}, flush=True)


if __name__ == "__main__":
    main()
