"""Question: do every representation, every discrete-step strategy and the checkpoint round
trip run on a CUDA device, and do they agree with the same run on the CPU?

A two-layer MLP (64 -> 128 -> 64) is compressed on the CPU, copied to the device, and both
copies take the same 5 PV steps (Adam on the continuous parameters, each strategy's discrete
step) on the same least-squares batch. Per representation and strategy: the largest relative
difference of the step losses, the fraction of code entries that end equal, and whether the
device model saved with ``save_quantized`` loads back bit-exactly. Random draws (stochastic
rounding) come from CPU generators, so they are the same numbers on both devices. The check
needs an accelerator and is not part of the test suite (CI has none):

    python benchmarks/cuda_paths.py            # on a machine with CUDA
    python benchmarks/cuda_paths.py --device cpu   # CPU against CPU: everything must agree
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = 5
# step sizes that move codes on this toy within 5 steps
CODE_LR = {"frozen": 0.0, "ste": 3e-2, "stochastic_rounding": 3e-2, "linearized_v": 0.05,
           "subspace_v": 0.05, "subspace_v_ste": 3e-2}


def configs():
    from pvtune import (
        AQLMConfig,
        BinaryConfig,
        NMSparseConfig,
        TernaryConfig,
        UniformConfig,
        VQConfig,
    )

    return {"uniform-2bit-g16": UniformConfig(bits=2, group_size=16),
            "binary-g16": BinaryConfig(group_size=16),
            "ternary-g16": TernaryConfig(group_size=16),
            "nm-2:4": NMSparseConfig(n=2, m=4),
            "vq-64x4": VQConfig(num_codewords=64, group_size=4, kmeans_iters=5),
            "aqlm-2x6g8": AQLMConfig(num_codebooks=2, nbits_per_codebook=6, in_group_size=8,
                                     kmeans_iters=5)}


def build(config):
    import torch
    from torch import nn

    from pvtune import quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    quantize_(model, config)
    return model


def run(model, strategy: str, x, y):
    """5 PV steps; returns the step losses and the final code tensors (on the CPU)."""
    import torch

    from pvtune.nn.quantize import quantized_layers
    from pvtune.optim import PVOptimizer, VStepConfig, continuous_parameters

    opt = PVOptimizer(model, torch.optim.Adam(continuous_parameters(model), lr=1e-3),
                      VStepConfig(strategy=strategy, lr=CODE_LR[strategy], tau=0.1))
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    codes = {f"{name}.{b}": getattr(layer.qweight, b).detach().cpu()
             for name, layer in quantized_layers(model).items()
             for b in layer.qweight.code_buffers}
    return losses, codes


def round_trip_exact(model, config) -> bool:
    """Save the device model, load it into a fresh CPU model: every tensor bit-identical."""
    import torch

    from pvtune import load_quantized, save_quantized

    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(model, tmp)
        fresh = load_quantized(build(config), tmp)
    a = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    b = fresh.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> None:
    import torch
    from common import stamped, write_results

    from pvtune.optim.strategies import STRATEGIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run this on a machine with one, or pass --device cpu")
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g)
    y = torch.tanh(x @ torch.randn(64, 64, generator=g)) * 0.5

    rows, failures = [], 0
    for name, config in configs().items():
        for strategy in STRATEGIES.names():
            row = {"representation": name, "strategy": strategy}
            try:
                cpu_model = build(config)
                dev_model = copy.deepcopy(cpu_model).to(device)
                cpu_losses, cpu_codes = run(cpu_model, strategy, x, y)
                dev_losses, dev_codes = run(dev_model, strategy, x.to(device), y.to(device))
                row["max_rel_loss_diff"] = max(abs(a - b) / max(abs(a), 1e-12)
                                               for a, b in zip(cpu_losses, dev_losses, strict=True))
                equal = sum(int((cpu_codes[k] == dev_codes[k]).sum()) for k in cpu_codes)
                row["codes_equal"] = equal / sum(v.numel() for v in cpu_codes.values())
                row["loss_start"], row["loss_end"] = dev_losses[0], dev_losses[-1]
                row["round_trip_exact"] = round_trip_exact(dev_model, config)
                row["status"] = "ok" if row["round_trip_exact"] else "round trip differs"
            except Exception as exc:  # report every failing path, not just the first
                traceback.print_exc()
                row["status"] = f"error: {type(exc).__name__}: {exc}"[:120]
            failures += row["status"] != "ok"
            row = stamped(row)
            print(row, flush=True)
            rows.append(row)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    write_results(f"cuda_paths_{device.type}", __doc__.split("\n\n")[0]
                  .removeprefix("Question: "), rows,
                  ["representation", "strategy", "status", "max_rel_loss_diff", "codes_equal",
                   "loss_start", "loss_end", "round_trip_exact"],
                  key=["representation", "strategy"],
                  notes=f"Device: {name}. {STEPS} PV steps per run; losses are the device "
                        "run's.", extra={"device": name})
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
