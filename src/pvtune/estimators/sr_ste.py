"""SR-STE for N:M structured sparsity (Zhou et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from pvtune.estimators.registry import register_estimator


def nm_mask(w: Tensor, n: int, m: int) -> Tensor:
    """Boolean mask keeping the ``n`` largest |w| in every block of ``m`` along the last dim."""
    if not 0 < n < m:
        raise ValueError(f"nm_mask: need 0 < n < m, got n={n}, m={m}")
    if w.shape[-1] % m:
        raise ValueError(f"nm_mask: last dim {w.shape[-1]} is not a multiple of m={m}")
    blocks = w.abs().reshape(*w.shape[:-1], w.shape[-1] // m, m)
    keep = blocks.topk(n, dim=-1).indices
    mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, keep, True)
    return mask.reshape(w.shape)


class SparseRefinedStraightThrough(torch.autograd.Function):
    """Forward ``mask * w``; backward ``g + decay * (1 - mask) * w`` (dense gradient plus a
    decay that pulls pruned weights towards zero)."""

    @staticmethod
    def forward(ctx, w: Tensor, mask: Tensor, decay: float) -> Tensor:
        ctx.save_for_backward(w, mask)
        ctx.decay = decay
        return w * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        w, mask = ctx.saved_tensors
        return grad + ctx.decay * (~mask).to(w.dtype) * w, None, None


@register_estimator("sr_ste")
def sr_ste(w: Tensor, n: int, m: int, decay: float = 2e-4, mask: Tensor | None = None) -> Tensor:
    """N:M sparse forward with SR-STE's backward; the mask is recomputed from |w| unless given."""
    if mask is None:
        mask = nm_mask(w.detach(), n, m)
    return SparseRefinedStraightThrough.apply(w, mask, float(decay))
