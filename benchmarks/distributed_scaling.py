"""How do PV-Tuning steps and compression scale from 1 to 2 processes (torchrun, gloo) on this
machine, where does the time go, and how much does a step communicate?

On the default model (SmolLM2-135M): `pvtune compress --method gptq --bits 2` and `pvtune
finetune` (a 2-bit RTN checkpoint, subspace V + STE), each run once with one process (all
cores) and once under `torchrun --nproc-per-node 2` (one thread each), same global batch.
Records wall time, the finetune's own split (forward+backward, P step, V step; the rest of
the step is the all-reduce and waiting), the bytes one step all-reduces (every continuous
gradient and every compressed weight's dense gradient, float32) and, on paper, the same for
a 7B model on 8 GPUs.

    python benchmarks/distributed_scaling.py     # about 10 minutes here

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
            "(measured here, extrapolated to a 7B model on 8 GPUs).")
PVTUNE = Path(sys.executable).parent / "pvtune"


def launch(nproc: int, args: list[str], threads: int) -> tuple[float, subprocess.Popen]:
    """Run ``pvtune ARGS`` with ``nproc`` processes (torchrun when > 1); return wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", str(PVTUNE)] if nproc > 1 else [str(PVTUNE)]) + args
    t0 = time.perf_counter()
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    return seconds, run


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calib-seqs", type=int, default=16)
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["--no-eval", "--num-seqs", str(args.calib_seqs), "--seq-len",
                  str(args.seq_len), "--max-new-tokens", "0", "--overwrite"]
        for nproc in (1, 2):
            out = tmp / f"gptq{nproc}"
            wall, _ = launch(nproc, ["compress", "--method", "gptq", "--bits", "2",
                                     *common, "--output", str(out)],
                             threads=cores if nproc == 1 else max(1, cores // nproc))
            meta = json.loads((out / "pvtune_meta.json").read_text())
            rows.append(stamped({"job": "compress gptq 2-bit", "processes": nproc,
                                 "wall_s": wall, "work_s": meta["compress_seconds"]}))
            print(rows[-1]["job"], nproc, f"{wall:.0f} s", flush=True)
        base = tmp / "rtn"
        launch(1, ["compress", "--method", "rtn", "--bits", "2", *common, "--output",
                   str(base)], threads=cores)
        volume = reduced_bytes(base)
        for nproc in (1, 2):
            out = tmp / f"ft{nproc}"
            wall, _ = launch(nproc, ["finetune", str(base), "--steps", str(args.steps),
                                     "--batch-size", "2", "--num-seqs", "8", "--seq-len",
                                     str(args.seq_len), "--no-eval", "--output", str(out)],
                             threads=cores if nproc == 1 else max(1, cores // nproc))
            res = json.loads((out / "pvtune_meta.json").read_text())["finetune_result"]
            steps = len(res["losses"])
            fb, pc, vd, ar = (res["seconds_forward_backward"], res["seconds_continuous"],
                              res["seconds_discrete"], res.get("seconds_allreduce", 0.0))
            rows.append(stamped({"job": "finetune subspace_v_ste", "processes": nproc,
                                 "wall_s": wall, "work_s": fb + pc + vd + ar,
                                 "steps_per_s": steps / (fb + pc + vd + ar),
                                 "forward_backward_s": fb, "allreduce_s": ar, "p_step_s": pc,
                                 "v_step_s": vd,
                                 "allreduce_mib": volume["bytes"] / 2**20 if nproc > 1 else 0,
                                 "final_kl": res["losses"][-1]}))
            print(rows[-1]["job"], nproc, f"{wall:.0f} s", flush=True)
    for job in {r["job"] for r in rows}:
        one = next(r for r in rows if r["job"] == job and r["processes"] == 1)
        for r in rows:
            if r["job"] == job:
                r["speedup_vs_1"] = one["work_s"] / r["work_s"]
    seven_b = 4 * 6.74e9  # float32 gradients of every weight of a 7B model
    ring = 2 * 7 / 8 * seven_b
    notes = (f"SmolLM2-135M, {args.calib_seqs} x {args.seq_len} calibration tokens for "
             f"compression; fine-tuning: {args.steps} steps, global batch 2 x {args.seq_len} "
             "tokens (1 sequence per process at 2 processes), no evaluation. work_s: the "
             "command's own timer (compression) or forward+backward + all-reduce + P + V step "
             "seconds of rank 0 (fine-tuning); wall_s includes start-up (loading the model "
             "in every process). One step all-reduces "
             f"{volume['continuous']:,} continuous gradients + {volume['dense_gradients']:,} "
             f"dense weight gradients = {volume['bytes'] / 2**20:.0f} MiB (float32). "
             f"On paper, a 7B model: about {seven_b / 2**30:.0f} GiB of float32 gradients "
             f"per step; a ring all-reduce over 8 GPUs sends {ring / 2**30:.0f} GiB per GPU, "
             "about 0.15 s at 300 GB/s NVLink, small beside a step's compute at a global "
             "batch of millions of tokens. Only 2 cores here: two processes share them, so "
             "expect little speed-up.")
    write_results("distributed_scaling", QUESTION, rows,
                  ["job", "processes", "wall_s", "work_s", "speedup_vs_1", "steps_per_s",
                   "forward_backward_s", "allreduce_s", "p_step_s", "v_step_s",
                   "allreduce_mib"],
                  key=["job", "processes"], notes=notes)


if __name__ == "__main__":
    main()
