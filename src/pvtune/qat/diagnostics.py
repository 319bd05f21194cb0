"""What QAT papers log: how many signs, levels or mask entries flip between steps (SR-STE's
SAD for N:M masks), ReSTE's estimating error and gradient stability, and bits per weight."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pvtune.estimators import binary_sign
from pvtune.qat.convert import qat_layers
from pvtune.qat.projections import BinaryProjection, NMSparseProjection
from pvtune.reprs.base import representation_for


class FlipTracker:
    """Counts, between calls of :meth:`update`, the entries of each QAT layer's discrete
    state (sign, level, N:M mask) that changed. For N:M masks the count is SR-STE's sum of
    absolute differences (SAD): a pruned and a revived weight count 2."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = qat_layers(model)
        self.previous = {n: layer.codes() for n, layer in self.layers.items()}

    def update(self) -> dict[str, Any]:
        """Changes since the last call: ``{"changed", "total", "fraction", "sad",
        "layers": {name: {"changed", "fraction"}}}`` (``sad`` sums the N:M layers only)."""
        report: dict[str, Any] = {"layers": {}}
        changed = total = sad = 0
        for name, layer in self.layers.items():
            now = layer.codes()
            diff = int((now != self.previous[name]).sum())
            self.previous[name] = now
            report["layers"][name] = {"changed": diff, "fraction": diff / now.numel()}
            changed, total = changed + diff, total + now.numel()
            if isinstance(layer.projection, NMSparseProjection):
                sad += diff
        report.update(changed=changed, total=total, fraction=changed / max(total, 1), sad=sad)
        return report


def reste_layer_indicators(model: nn.Module) -> dict[str, dict[str, float]]:
    """ReSTE's diagnostics per binary QAT layer, on ``u = w / alpha`` (what the sign sees):
    estimating error ``||sign(u)|u|^(1/o) - sign(u)||_2`` at the layer's current ``o`` (1 for
    non-ReSTE estimators, where the estimate is the identity) and gradient stability
    ``Var(|dL/dw|)`` (after a backward; NaN without gradients)."""
    out = {}
    for name, layer in qat_layers(model).items():
        proj = layer.projection
        if not isinstance(proj, BinaryProjection):
            continue
        est = proj.est
        o = est.reste_power(layer.progress) if est.name == "reste" else 1.0
        with torch.no_grad():
            w = layer.flat_latent().detach()
            u = proj.grouped(w) / proj.absmean(w).unsqueeze(-1)
            f = torch.sign(u) * u.abs().pow(1.0 / o)
            err = float(torch.linalg.vector_norm(f - binary_sign(u)))
            grad = layer.weight.grad
            stab = float(grad.abs().var()) if grad is not None else float("nan")
        out[name] = {"o": o, "estimating_error": err, "gradient_stability": stab}
    return out


def layer_bits(model: nn.Module) -> dict[str, float]:
    """Bits per weight each QAT layer will store once frozen (the representation's exact
    packed cost)."""
    bits = {}
    for name, layer in qat_layers(model).items():
        cfg = layer.config.representation
        out_f, in_f = layer.flat_latent().shape
        bits[name] = representation_for(cfg)(out_f, in_f, cfg).bits_per_param()
    return bits
