"""Estimators with random forward passes: stochastic rounding and Gumbel-softmax ST."""

from __future__ import annotations

import torch
from torch import Tensor

from pvtune.estimators.registry import register_estimator


class StochasticRound(torch.autograd.Function):
    """Forward ``floor(x + u)``, ``u ~ U[0, 1)`` (unbiased rounding); backward identity."""

    @staticmethod
    def forward(ctx, x: Tensor, noise: Tensor) -> Tensor:
        return torch.floor(x + noise)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class GumbelSoftmaxStraightThrough(torch.autograd.Function):
    """Forward ``one_hot(argmax(logits + G))``; backward the Jacobian of
    ``softmax((logits + G) / tau)``: ``dL/dl = (1/tau) p * (g - <g, p>)``."""

    @staticmethod
    def forward(ctx, logits: Tensor, gumbel: Tensor, tau: float, dim: int) -> Tensor:
        perturbed = logits + gumbel
        soft = torch.softmax(perturbed / tau, dim=dim)
        ctx.save_for_backward(soft)
        ctx.tau, ctx.dim = tau, dim
        index = perturbed.argmax(dim=dim, keepdim=True)
        return torch.zeros_like(logits).scatter_(dim, index, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (soft,) = ctx.saved_tensors
        inner = (grad * soft).sum(dim=ctx.dim, keepdim=True)
        return soft * (grad - inner) / ctx.tau, None, None, None


@register_estimator("stochastic_rounding")
def stochastic_rounding(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Unbiased random rounding to a neighbouring integer, identity backward."""
    noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return StochasticRound.apply(x, noise)


def sample_gumbel(shape: torch.Size, *, generator=None, dtype=None, device=None) -> Tensor:
    """Standard Gumbel noise ``-log(-log(U))``."""
    u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    tiny = torch.finfo(u.dtype).tiny
    neg_log_u = (-torch.log(u.clamp(min=tiny))).clamp(min=tiny)
    return -torch.log(neg_log_u)


@register_estimator("gumbel_softmax_st")
def gumbel_softmax_st(
    logits: Tensor,
    tau: float = 1.0,
    dim: int = -1,
    generator: torch.Generator | None = None,
    gumbel: Tensor | None = None,
) -> Tensor:
    """Straight-through Gumbel-softmax: a hard one-hot sample with the soft sample's gradient.

    ``gumbel`` may be passed to fix the noise (tests, antithetic sampling).
    """
    if tau <= 0:
        raise ValueError(f"gumbel_softmax_st: tau must be > 0, got {tau}")
    if gumbel is None:
        gumbel = sample_gumbel(
            logits.shape, generator=generator, dtype=logits.dtype, device=logits.device
        )
    return GumbelSoftmaxStraightThrough.apply(logits, gumbel, float(tau), dim)
