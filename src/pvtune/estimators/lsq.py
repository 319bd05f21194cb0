"""Learned step size quantization (LSQ, Esser et al. 2019)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pvtune.estimators.registry import register_estimator


class LearnedStepQuantize(torch.autograd.Function):
    """Forward ``round(clamp(x / s, qmin, qmax)) * s``.

    Backward: ``dL/dx = g`` inside the range, 0 outside; ``dL/ds`` sums
    ``g * (round(x/s) - x/s)`` inside and ``g * qmin`` / ``g * qmax`` outside, times
    ``grad_scale`` (LSQ uses ``1 / sqrt(numel * qmax)``), reduced to the shape of ``s``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qmin: int, qmax: int, grad_scale: float) -> Tensor:
        v = x / step
        ctx.save_for_backward(v, step)
        ctx.params = (qmin, qmax, grad_scale)
        return torch.round(v.clamp(qmin, qmax)) * step

    @staticmethod
    def backward(ctx, grad: Tensor):
        v, step = ctx.saved_tensors
        qmin, qmax, grad_scale = ctx.params
        below, above = v < qmin, v > qmax
        inside = ~(below | above)
        grad_x = grad * inside.to(grad.dtype)
        dstep = torch.where(below, float(qmin), torch.where(above, float(qmax), v.round() - v))
        grad_s = (grad * dstep * grad_scale).sum_to_size(step.shape)
        return grad_x, grad_s, None, None, None


@register_estimator("lsq")
def lsq(
    x: Tensor, step: Tensor, qmin: int, qmax: int, grad_scale: float | None = None
) -> Tensor:
    """LSQ fake quantization with a learned (broadcastable) step ``step``."""
    if qmin >= qmax:
        raise ValueError(f"lsq: need qmin < qmax, got qmin={qmin}, qmax={qmax}")
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(x.numel() * max(qmax, 1))
    return LearnedStepQuantize.apply(x, step, int(qmin), int(qmax), float(grad_scale))
