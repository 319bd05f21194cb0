"""Straight-through estimators for rounding and sign: STE, clipped STE, ApproxSign, ReSTE.

Each is one named ``torch.autograd.Function``; the functional wrappers are registered.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pvtune.estimators.registry import register_estimator


def binary_sign(x: Tensor) -> Tensor:
    """sign(x) with sign(0) = +1, so the result is always +-1."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class StraightThrough(torch.autograd.Function):
    """Forward ``quantize(x)``; backward passes the gradient unchanged (dL/dx = g)."""

    @staticmethod
    def forward(ctx, x: Tensor, quantize: Callable[[Tensor], Tensor]) -> Tensor:
        return quantize(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class ClippedStraightThrough(torch.autograd.Function):
    """Forward ``quantize(x)``; backward ``g * 1[|x| <= clip]``."""

    @staticmethod
    def forward(ctx, x: Tensor, quantize: Callable[[Tensor], Tensor], clip: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.clip = clip
        return quantize(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None, None


class ApproxSign(torch.autograd.Function):
    """Bi-Real Net's ApproxSign: forward sign(x); backward ``g * 2(1 - |x|)`` on |x| <= 1."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        slope = torch.clamp(2.0 * (1.0 - x.abs()), min=0.0)
        return grad * slope


class RectifiedStraightThrough(torch.autograd.Function):
    """ReSTE: forward sign(x); backward the derivative of ``f_o(x) = sign(x)|x|^(1/o)``.

    ``dL/dx = g * (1/o) |x|^((1-o)/o)`` for ``m < |x| <= t``; the secant slope
    ``m^(1/o) / m`` for ``|x| <= m``; 0 for ``|x| > t`` (``m = 0.1``, ``t = 1.5``).
    """

    @staticmethod
    def forward(ctx, x: Tensor, o: float, t: float, m: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.params = (o, t, m)
        return binary_sign(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        o, t, m = ctx.params
        ax = x.abs()
        power = (1.0 / o) * ax.clamp(min=m).pow((1.0 - o) / o)
        inner = math.pow(m, 1.0 / o) / m
        slope = torch.where(ax <= m, torch.full_like(ax, inner), power)
        slope = torch.where(ax > t, torch.zeros_like(ax), slope)
        return grad * slope, None, None, None


class HardForward(torch.autograd.Function):
    """Forward the value of ``hard`` exactly; backward the gradient to ``soft`` unchanged."""

    @staticmethod
    def forward(ctx, hard: Tensor, soft: Tensor) -> Tensor:
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, grad


def hard_forward(hard: Tensor, soft: Tensor) -> Tensor:
    """``hard`` in the forward pass (bit for bit, unlike ``soft + (hard - soft).detach()``),
    the identity to ``soft`` in the backward pass: the straight-through pattern for a discrete
    choice (a codeword, a one-hot, a mask) whose surrogate is ``soft``."""
    if hard.shape != soft.shape:
        raise ValueError(f"hard_forward: shapes differ, {list(hard.shape)} vs "
                         f"{list(soft.shape)}")
    return HardForward.apply(hard.detach(), soft)


@register_estimator("ste")
def ste(x: Tensor, quantize: Callable[[Tensor], Tensor] = torch.round) -> Tensor:
    """Straight-through estimator: ``quantize(x)`` forward, identity backward."""
    return StraightThrough.apply(x, quantize)


@register_estimator("clipped_ste")
def clipped_ste(
    x: Tensor, quantize: Callable[[Tensor], Tensor] = binary_sign, clip: float = 1.0
) -> Tensor:
    """Clipped STE: ``quantize(x)`` forward (sign by default), ``g * 1[|x| <= clip]`` backward."""
    if clip <= 0:
        raise ValueError(f"clipped_ste: clip must be > 0, got {clip}")
    return ClippedStraightThrough.apply(x, quantize, float(clip))


@register_estimator("approx_sign")
def approx_sign(x: Tensor) -> Tensor:
    """Bi-Real Net ApproxSign estimator for sign(x)."""
    return ApproxSign.apply(x)


@register_estimator("reste")
def reste(x: Tensor, o: float = 1.0, t: float = 1.5, m: float = 0.1) -> Tensor:
    """Rectified STE for sign(x) with power ``o >= 1`` (see :func:`reste_schedule`)."""
    if o < 1.0:
        raise ValueError(f"reste: o must be >= 1, got {o}")
    if not 0.0 < m < t:
        raise ValueError(f"reste: need 0 < m < t, got m={m}, t={t}")
    return RectifiedStraightThrough.apply(x, float(o), float(t), float(m))


def reste_schedule(epoch: float, total_epochs: float, o_end: float = 3.0) -> float:
    """ReSTE's power schedule ``o(e) = 1 + (o_end - 1)(1 - cos(pi e / (2E)))``."""
    if total_epochs <= 0:
        raise ValueError(f"reste_schedule: total_epochs must be > 0, got {total_epochs}")
    frac = min(max(epoch / total_epochs, 0.0), 1.0)
    return 1.0 + (o_end - 1.0) * (1.0 - math.cos(math.pi * frac / 2.0))


def reste_indicators(weights: list[Tensor], grads: list[Tensor], o: float) -> dict[str, float]:
    """ReSTE's two diagnostics over layers.

    ``estimating_error = sum ||f_o(w) - sign(w)||_2`` and
    ``gradient_stability = sum Var(|dL/dw|)``.
    """
    err = 0.0
    for w in weights:
        f = torch.sign(w) * w.abs().pow(1.0 / o)
        err += float(torch.linalg.vector_norm(f - binary_sign(w)))
    stab = sum(float(g.abs().var()) for g in grads)
    return {"estimating_error": err, "gradient_stability": stab}
