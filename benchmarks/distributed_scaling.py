"""How do PV-Tuning steps and compression scale from 1 to 2 processes (torchrun, gloo) on this
machine, where does the time go, and how much does a step communicate?

On the default model (SmolLM2-135M): `pvtune compress --method gptq --bits 2` and `pvtune
finetune` (a 2-bit RTN checkpoint, subspace V + STE), each run once with one process (all
cores) and under `torchrun --nproc-per-node 2` (one thread each), same global batch; the
2-process fine-tune once per V-step placement (`replicated`: every rank steps every weight;
`owner`: each weight on one rank, which sends the changed codes; `owner+shard`: with FSDP2
sharding of the continuous parameters). Records wall time, peak memory per process, the
finetune's own split (forward+backward, P step, V step, communication), the bytes one step
sends and, on paper, the same for larger models on 8 GPUs.

    python benchmarks/distributed_scaling.py     # about 20 minutes here (2 rounds)

Writes results/distributed_scaling.{json,md}.
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
from common import ROOT, stamped, write_results  # noqa: E402

QUESTION = ("PV-Tuning steps/s and compression time at 1 and 2 processes (torchrun, gloo, "
            "this 2-core machine), where the time goes, and the bytes one step all-reduces "
            "(measured here, on paper for larger models on 8 GPUs), with the V step "
            "replicated or on owner ranks.")
PVTUNE = Path(sys.executable).parent / "pvtune"


# runs a command and prints the largest resident set of its processes (KiB) last
PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
        "file=sys.stderr); sys.exit(code)")


def launch(nproc: int, args: list[str], threads: int) -> tuple[float, float]:
    """Run ``pvtune ARGS`` with ``nproc`` processes (torchrun when > 1); return wall seconds
    and the largest resident memory of one process (MiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", str(PVTUNE)] if nproc > 1 else [str(PVTUNE)]) + args
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", PEAK, *cmd], env=env, capture_output=True,
                         text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in reversed(run.stderr.splitlines())
                if line.startswith("peak_rss_kib"))
    return seconds, peak / 1024


def reduced_bytes(checkpoint: Path) -> dict[str, int]:
    """Elements one PV step all-reduces: continuous parameters + dense weight gradients."""
    from pvtune.llm.model import load_causal_lm
    from pvtune.nn.quantize import decoder_layers
    from pvtune.optim.pv import continuous_parameters

    model, _ = load_causal_lm(checkpoint)
    continuous = sum(p.numel() for p in continuous_parameters(model))
    dense = sum(layer.out_features * layer.in_features
                for layer in decoder_layers(model).values())
    return {"continuous": continuous, "dense_gradients": dense,
            "bytes": 4 * (continuous + dense)}


def volume_on_paper(gpus: int = 8) -> str:
    """Bytes each GPU sends per step in a ring all-reduce of float32 gradients (``2 (N-1)/N``
    times their size), for Llama-like models, as a markdown table."""
    # (name, compressed linear weights, continuous parameters: embeddings, head, norms)
    models = [("SmolLM2-135M", 106.2e6, 30.0e6), ("Llama-2-7B", 6.48e9, 0.27e9),
              ("Llama-3-70B", 68.5e9, 2.1e9)]
    ring = 2 * (gpus - 1) / gpus
    lines = [f"On paper, {gpus} GPUs, ring all-reduce, float32 gradients "
             "(the owner placement reduces each dense gradient to one rank: about half a "
             "ring all-reduce, and adds the changed codes, at most 1 byte per weight):", "",
             "| model | dense weight gradients | replicated: GiB sent per GPU per step | "
             "at 300 GB/s (NVLink) |", "|---|---|---|---|"]
    for name, dense, continuous in models:
        sent = ring * 4 * (dense + continuous)
        lines.append(f"| {name} | {dense / 1e9:.2f} G | {sent / 2**30:.1f} | "
                     f"{sent / 300e9:.3f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-seqs", type=int, default=16)
    p.add_argument("--code-lr", type=float, default=0.2,
                   help="discrete step size: large enough that codes change within the few "
                        "steps (the default 0.01 changes none in 6), so owners send codes")
    p.add_argument("--repeats", type=int, default=2, help="runs of each arm; the fastest "
                   "is reported (this machine is shared and noisy)")
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["--no-eval", "--num-seqs", str(args.calib_seqs), "--seq-len",
                  str(args.seq_len), "--max-new-tokens", "0", "--overwrite"]

        def compress(nproc: int) -> dict:
            out = tmp / f"gptq{nproc}"
            wall, peak = launch(nproc, ["compress", "--method", "gptq", "--bits", "2",
                                        *common, "--output", str(out)],
                                threads=cores if nproc == 1 else max(1, cores // nproc))
            meta = json.loads((out / "pvtune_meta.json").read_text())
            return stamped({"job": "compress gptq 2-bit", "processes": nproc,
                            "vstep_placement": "", "wall_s": wall,
                            "work_s": meta["compress_seconds"], "peak_rss_mib": peak})

        base = tmp / "rtn"
        launch(1, ["compress", "--method", "rtn", "--bits", "2", *common, "--output",
                   str(base)], threads=cores)
        volume = reduced_bytes(base)

        def finetune(nproc: int, placement: str) -> dict:
            out = tmp / f"ft{nproc}{placement}"
            shard = ["--shard"] if placement.endswith("+shard") else []
            wall, peak = launch(nproc, ["finetune", str(base), "--steps", str(args.steps),
                                        "--batch-size", "2", "--num-seqs", "8", "--seq-len",
                                        str(args.seq_len), "--no-eval", "--code-lr",
                                        str(args.code_lr), "--vstep-placement",
                                        placement.removesuffix("+shard"), *shard,
                                        "--overwrite", "--output", str(out)],
                                threads=cores if nproc == 1 else max(1, cores // nproc))
            res = json.loads((out / "pvtune_meta.json").read_text())["finetune_result"]
            steps = len(res["losses"])
            fb, pc, vd, ar = (res["seconds_forward_backward"], res["seconds_continuous"],
                              res["seconds_discrete"], res.get("seconds_allreduce", 0.0))
            sent = 0.0
            if nproc > 1:  # float32 gradients, plus the codes rank 0 sent as an owner
                grads = volume["bytes"] if placement.startswith("replicated") else \
                    4 * volume["continuous"] + 4 * volume["dense_gradients"] / nproc
                sent = (grads + res.get("code_bytes_sent", 0) / steps) / 2**20
            return stamped({"job": "finetune subspace_v_ste", "processes": nproc,
                            "vstep_placement": placement if nproc > 1 else "",
                            "wall_s": wall, "work_s": fb + pc + vd + ar,
                            "steps_per_s": steps / (fb + pc + vd + ar),
                            "forward_backward_s": fb, "communication_s": ar,
                            "p_step_s": pc, "v_step_s": vd, "mib_per_step": sent,
                            "peak_rss_mib": peak, "first_kl": res["losses"][0],
                            "final_kl": res["losses"][-1],
                            "codes_changed": sum(res["fraction_changed"])})

        arms = [lambda: compress(1), lambda: compress(2), lambda: finetune(1, "replicated"),
                lambda: finetune(2, "replicated"), lambda: finetune(2, "owner"),
                lambda: finetune(2, "owner+shard")]
        runs: list[list[dict]] = [[] for _ in arms]
        for _ in range(args.repeats):  # rounds over all arms: noise spreads over them all
            for arm, record in zip(arms, runs, strict=True):
                record.append(arm())
                r = record[-1]
                print(r["job"], r["processes"], r["vstep_placement"], f"{r['wall_s']:.0f} s",
                      flush=True)
    rows = []
    for record in runs:  # the fastest run of each arm; every run's work time kept
        best = min(record, key=lambda r: r["work_s"])
        rows.append({**best, "work_s_runs": [r["work_s"] for r in record]})
    for job in {r["job"] for r in rows}:
        one = next(r for r in rows if r["job"] == job and r["processes"] == 1)
        for r in rows:
            if r["job"] == job:
                r["speedup_vs_1"] = one["work_s"] / r["work_s"]
    paper = volume_on_paper()
    notes = (f"SmolLM2-135M, {args.calib_seqs} x {args.seq_len} calibration tokens for "
             f"compression; fine-tuning: {args.steps} steps, global batch 2 x {args.seq_len} "
             f"tokens (1 sequence per process at 2 processes), --code-lr {args.code_lr}, no "
             "evaluation; codes_changed: the fractions of groups whose codes changed, summed "
             "over the steps. first_kl / final_kl: the KL of the first and last step. 1 and 2 "
             "processes may drift apart after a few steps: 2 processes average two gradients "
             "where 1 sums a batch, a different float order that Adam amplifies on near-zero "
             "gradients (checked by hand at the default --code-lr, where no code changed: "
             "steps 1-3 agreed to 1e-6, step 6 gave 8.083 against 8.127, and 1 process gave "
             "the same KLs at 1 and 2 threads). work_s: the "
             "command's own timer (compression) or forward+backward + all-reduce + P + V step "
             "seconds of rank 0 (fine-tuning); wall_s includes start-up (loading the model "
             f"in every process). Each arm ran {args.repeats} times, in rounds over all "
             "arms; the table shows the run with the least work_s, the JSON every run's "
             "work_s. mib_per_step: what one step reduces, float32 ("
             f"{volume['continuous']:,} continuous gradients, all-reduced, and "
             f"{volume['dense_gradients']:,} dense weight gradients: all-reduced when "
             "replicated, each reduced to its owner, i.e. 1/N of them per rank, with owners), "
             "plus the changed code bytes rank 0 broadcast as an owner (with --shard, FSDP "
             "reduce-scatters the continuous gradients and all-gathers their parameters "
             "instead: 1.5x the bytes of their all-reduce per micro-batch). "
             "peak_rss_mib: the largest resident memory of one process (the teacher, the "
             "student, Adam and V-step state). Only 2 cores here: "
             "two processes share them, so expect little speed-up.\n\n" + paper)
    write_results("distributed_scaling", QUESTION, rows,
                  ["job", "processes", "wall_s", "work_s", "speedup_vs_1", "steps_per_s",
                   "forward_backward_s", "communication_s", "p_step_s", "v_step_s",
                   "mib_per_step", "peak_rss_mib", "codes_changed", "first_kl", "final_kl",
                   "vstep_placement"],
                  key=["job", "processes", "vstep_placement"], notes=notes)


if __name__ == "__main__":
    main()
