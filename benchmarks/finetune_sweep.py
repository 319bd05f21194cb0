"""Question: which fine-tuning settings should be pvtune's defaults, and does PV-Tuning
(subspace V + STE) then beat STE, stochastic rounding and continuous-only fine-tuning?

Phase ``sweep``: the starting point's perplexity (``calibration_only``), then subspace V +
STE from each starting point (``q2_0``: GPTQ into llama.cpp's
Q2_0 blocks; ``aqlm2x8g8``: AQLM 2x8g8), one setting changed at a time around the current
defaults (relative code step, tau, continuous learning rate, schedule, batch size), each arm
``--steps`` (200) steps on calibration sequences that are never repeated (steps x batch
sequences of 256 tokens), and STE at the arms where PV-Tuning's cap of ``tau`` changed
groups per step binds (below it the two make nearly the same decisions). Phase
``strategies``: every strategy at the settings the sweep chose (``--settings``), seeds 0, 1
and 2.

The test, fixed before the runs: PV-Tuning beats STE on a representation when its
perplexity on the Wikipedia evaluation windows is lower at every one of the 3 seeds (a
one-sided sign test; 3 of 3 has probability 1/8 under "either is as likely to win"). The
unrelated text (``offline:moby-dick``) is reported beside it.

Each arm runs in its own process (``finetune_strategies.py --single``) and its row is
written as soon as it ends; arms already in the table are skipped (``--remeasure`` runs them
again) and rows of other commits stay, marked carried over, so a sweep longer than one
sitting resumes where it stopped::

    python benchmarks/finetune_sweep.py --phase sweep --reprs q2_0
    python benchmarks/finetune_sweep.py --phase sweep --reprs q2_0 --arms ste:code_lr=x1
    python benchmarks/finetune_sweep.py --phase strategies --settings lr=1e-4,tau=0.03
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NAME = "finetune_sweep"
# the centre of the sweep: code_lr in units of START_CODE_LR (0.3 of it is the step the first
# arms measured best, 0.0099 of the grid step)
BASE = {"code_lr": 0.3, "tau": 0.01, "lr": 3e-5, "schedule": "constant", "batch_size": 2}
# the unit of code_lr (pvtune's defaults when the sweep began), so every arm means the same
# step at every commit
START_CODE_LR = {"grid": {"ste": 0.033, "subspace_v_ste": 0.033, "stochastic_rounding": 3.3e-3},
                 "rms": {"ste": 0.016, "subspace_v_ste": 0.016, "stochastic_rounding": 5.3e-3}}
# one setting changed at a time, the most informative first; code_lr in units of START_CODE_LR
ARMS = [{}, {"code_lr": 1.0}, {"code_lr": 0.1}, {"lr": 1e-4}, {"tau": 0.03},
        {"schedule": "cosine"}, {"tau": 0.003}, {"lr": 1e-5}, {"batch_size": 4},
        {"code_lr": 1.0, "tau": 0.001}]  # a larger step under a cap that binds
# STE at arms where PV-Tuning's tau cap binds: there the two make different decisions
STE_ARMS = [{"code_lr": 1.0}]
# the pair the fixed test compares runs first, at every seed, then the other strategies
STRATEGIES = [["ste", "subspace_v_ste"], ["frozen", "stochastic_rounding"]]
SEEDS = (0, 1, 2)
KEY = ("phase", "representation", "strategy", "arm", "seed")
COLUMNS = ["phase", "representation", "strategy", "arm", "seed", "steps", "perplexity",
           "unrelated_perplexity", "codes_changed", "most_in_one_step", "minutes",
           "discrete_over_fwd_bwd"]


def arm_name(arm: dict) -> str:
    """A short name of what an arm changes (``default`` for none)."""
    return ",".join(f"{k}={'x' if k == 'code_lr' else ''}{v:g}" if isinstance(v, float)
                    else f"{k}={v}" for k, v in sorted(arm.items())) or "default"


def parse_settings(text: str) -> dict:
    """``lr=1e-4,tau=0.03`` as an arm."""
    arm: dict = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in BASE:
            raise SystemExit(f"unknown setting {key!r}; known: {sorted(BASE)}")
        arm[key] = value if key == "schedule" else (int(value) if key == "batch_size"
                                                     else float(value))
    return arm


def absolute_code_lr(rep: str, strategy: str, scale: float) -> float | None:
    """The relative code step an arm's multiple of :data:`START_CODE_LR` stands for (None
    for a strategy that moves no codes)."""
    start = START_CODE_LR["rms" if rep.startswith("aqlm") else "grid"].get(strategy)
    return None if start is None else scale * start


def run_arm(rep: str, strategy: str, arm: dict, seed: int, args) -> dict:
    """One fine-tuning run in its own process; its row."""
    from finetune_strategies import run_single

    settings = {**BASE, **arm}
    code_lr = absolute_code_lr(rep, strategy, settings["code_lr"])
    batch = settings["batch_size"]
    return run_single(rep, strategy, [
        f"--steps={args.steps}", f"--batch-size={batch}", f"--lr={settings['lr']}",
        f"--tau={settings['tau']}", f"--schedule={settings['schedule']}",
        f"--num-seqs={args.steps * batch}", f"--eval-windows={args.eval_windows}",
        f"--unrelated-windows={args.eval_windows}", f"--seed={seed}",
    ] + ([f"--code-lr={code_lr}"] if code_lr is not None else []))


def existing_rows() -> list[dict]:
    from common import RESULTS

    path = RESULTS / f"{NAME}.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def verdict(rows: list[dict]) -> dict[str, str]:
    """The fixed test per representation: PV below STE at every seed of the strategies
    phase."""
    out = {}
    for rep in sorted({r["representation"] for r in rows if r["phase"] == "strategies"}):
        ppl = {(r["strategy"], r["seed"]): r["perplexity"] for r in rows
               if r["phase"] == "strategies" and r["representation"] == rep}
        seeds = [s for s in SEEDS if ("ste", s) in ppl and ("subspace_v_ste", s) in ppl]
        wins = sum(ppl[("subspace_v_ste", s)] < ppl[("ste", s)] for s in seeds)
        holds = len(seeds) == len(SEEDS) and wins == len(SEEDS)
        # a seed where PV is not below STE decides the test before every seed has run
        decided = len(seeds) == len(SEEDS) or wins < len(seeds)
        out[rep] = (f"PV below STE at {wins} of {len(seeds)} seeds: "
                    + ("holds" if holds else "not shown" if decided else "incomplete"))
    return out


def record(row: dict | None) -> None:
    """Merge ``row`` into the results (None: rebuild the table and plot from the JSON)."""
    from common import RESULTS, write_results

    def derive(rows: list[dict]) -> None:
        found = verdict(rows)
        for r in rows:
            r.pop("verdict", None)
            if r.get("fraction_changed"):  # does the tau cap on changes per step ever bind?
                r["codes_changed"] = sum(r["fraction_changed"])
                r["most_in_one_step"] = max(r["fraction_changed"])
        for r in rows:
            if r["phase"] == "strategies" and r["strategy"] == "subspace_v_ste":
                r["verdict"] = found.get(r["representation"])

    carry = [tuple(r.get(k) for k in KEY) for r in existing_rows()]
    rows = write_results(NAME, __doc__.split("\n\n")[0].removeprefix("Question: "),
                         [row] if row else [],
                         [*COLUMNS, "verdict"], key=KEY, derive=derive, carry=carry, notes=(
        "Starting points as in finetune_strategies.py; perplexity on the Wikipedia evaluation "
        "windows, unrelated_perplexity on offline:moby-dick (same number of windows of 512 "
        "tokens). arm: the settings changed from "
        f"{BASE} (code_lr=xK: K times the relative code step {START_CODE_LR['grid']} on the "
        f"grids, {START_CODE_LR['rms']} on AQLM). codes_changed: the share of code groups "
        "changed, summed over the steps; most_in_one_step: the largest share changed in one "
        "step (the subspace strategies allow at most tau). Loss curves and code-change "
        "fractions per step are in the JSON."))
    plot(rows, RESULTS / f"{NAME}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reps = sorted({r["representation"] for r in rows})
    fig, axes = plt.subplots(1, len(reps), figsize=(7 * len(reps), 4.5), squeeze=False)
    for ax, rep in zip(axes[0], reps, strict=True):
        for r in rows:
            if r["representation"] == rep and r.get("losses"):
                label = (f"{r['arm']}" if r["phase"] == "sweep"
                         else f"{r['strategy']} s{r['seed']}")
                ax.plot(r["losses"], label=f"{label} ({r['perplexity']:.1f})", lw=0.8)
        ax.set_title(rep)
        ax.set_xlabel("step")
        ax.set_ylabel("KL(teacher || student)")
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=["sweep", "strategies"], default="sweep")
    parser.add_argument("--reprs", nargs="+", default=["q2_0", "aqlm2x8g8"])
    parser.add_argument("--settings", type=parse_settings, default={},
                        help="the strategies phase's settings, e.g. lr=1e-4,tau=0.03")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-windows", type=int, default=24)
    parser.add_argument("--remeasure", action="store_true",
                        help="run arms again that the table already holds")
    parser.add_argument("--arms", nargs="+", metavar="STRATEGY:ARM",
                        help="run only these arms, e.g. ste:code_lr=x1 subspace_v_ste:tau=0.003")
    parser.add_argument("--rebuild", action="store_true",
                        help="only rebuild the table and plot from the JSON")
    args = parser.parse_args()
    if args.rebuild:
        record(None)
        return
    done = set() if args.remeasure else {tuple(r.get(k) for k in KEY) for r in existing_rows()}
    if args.phase == "sweep":
        jobs = [(rep, s, arm, 0) for rep in args.reprs  # the start first, unchanged
                for s, arms in (("calibration_only", [{}]), ("subspace_v_ste", ARMS),
                                ("ste", STE_ARMS))
                for arm in arms]
    else:
        jobs = [(rep, s, args.settings, seed) for rep in args.reprs for group in STRATEGIES
                for seed in SEEDS for s in group]
    for rep, strategy, arm, seed in jobs:
        key = (args.phase, rep, strategy, arm_name(arm), seed)
        if key in done or (args.arms and f"{strategy}:{arm_name(arm)}" not in args.arms):
            continue
        print(f"== {key}", flush=True)
        row = run_arm(rep, strategy, arm, seed, args)
        row.update(phase=args.phase, arm=arm_name(arm))
        record(row)
        print({k: v for k, v in row.items() if k not in ("losses", "fraction_changed")},
              flush=True)


if __name__ == "__main__":
    main()
