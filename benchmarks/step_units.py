"""Question: what relative code step sizes do the weight-unit steps measured on SmolLM2-135M
correspond to? The mean step unit (grid step, row scale) over its block linears, per
representation, and the measured step divided by it: pvtune's defaults.

The step sizes found best on SmolLM2 at about 2 bits (results/finetune_code_lr.md) were in
weight units: 1e-2 for STE and subspace V + STE on the 2-bit g64 grid, 3e-3 on AQLM 2x8g8
(1e-3 for stochastic rounding, 3e-4 for the linearized V steps, on both). Relative steps move
a weight by lr times its representation's step unit, so a model whose weights are 8x smaller
takes the same decisions; these are the conversions.

    python benchmarks/step_units.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import stamped, write_results  # noqa: E402

MEASURED = {  # weight-unit steps measured best on SmolLM2 (finetune_code_lr, finetune_strategies)
    "ste / subspace_v_ste": {"uniform 2-bit g64": 1e-2, "aqlm 2x8g8": 3e-3},
    "stochastic_rounding": {"uniform 2-bit g64": 1e-3, "aqlm 2x8g8": 1e-3},
    "linearized_v / subspace_v": {"uniform 2-bit g64": 3e-4, "aqlm 2x8g8": 3e-4},
}


def main() -> None:
    import torch

    from pvtune.llm.model import find_blocks, load_causal_lm
    from pvtune.optim.strategies import DEFAULT_LR
    from pvtune.reprs.uniform import UniformConfig, grid_params

    model, _ = load_causal_lm(None)
    grid, rms = [], []
    for block in find_blocks(model).blocks:
        for module in block.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.detach()
                scale, _ = grid_params(w.reshape(w.shape[0], -1, 64),
                                       UniformConfig(bits=2, group_size=64))
                grid.append(scale.reshape(-1))  # every group holds 64 weights: a weight mean
                rms.append(w.pow(2).mean(-1).sqrt().repeat_interleave(w.shape[1]))
    units = {"uniform 2-bit g64": ("grid", float(torch.cat(grid).mean())),
             "aqlm 2x8g8": ("rms", float(torch.cat(rms).mean()))}
    rows = []
    for strategy, steps in MEASURED.items():
        name = strategy.split(" / ")[0]
        for rep, step in steps.items():
            kind, unit = units[rep]
            rows.append(stamped({
                "strategy": strategy, "representation": rep, "unit_kind": kind,
                "mean_unit": round(unit, 4), "weight_unit_step": step,
                "relative_step": round(step / unit, 4),
                "pvtune_default": DEFAULT_LR[kind][name],
            }))
            print(rows[-1], flush=True)
    write_results(
        "step_units", __doc__.split("\n\n")[0].removeprefix("Question: "), rows,
        ["strategy", "representation", "unit_kind", "mean_unit", "weight_unit_step",
         "relative_step", "pvtune_default"], key=["strategy", "representation"],
        notes="mean_unit: the mean over every weight of the block linears of the 2-bit g64 "
              "min/max grid step (uniform) or of the row RMS, which AQLM's initial row scale "
              "is; relative_step = weight_unit_step / mean_unit; pvtune_default: "
              "pvtune.optim.strategies.DEFAULT_LR, the relative step rounded to two figures.",
    )


if __name__ == "__main__":
    main()
