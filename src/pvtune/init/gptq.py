"""GPTQ (Frantar et al. 2022): column-by-column rounding with error feedback through the
inverse Hessian ``H = E[x x^T]`` of the layer's calibration inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pvtune.init.registry import register_init
from pvtune.reprs.base import ReprConfig, check_range, representation_for
from pvtune.reprs.gguf_block import GGUFBlockConfig, GGUFBlockWeight
from pvtune.reprs.uniform import UniformConfig, UniformWeight


@dataclass(frozen=True)
class GPTQConfig:
    """``damp``: fraction of mean(diag H) added to the diagonal; ``block_size``: columns per
    lazy-update block; ``act_order``: process columns by decreasing ``diag(H)`` (with static
    per-group grids), on by default (benchmarks/results/compress_methods.md measures GPTQ with
    it against round-to-nearest; the comparison without it was not kept)."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True

    def __post_init__(self) -> None:
        check_range(self, "damp", self.damp, 0.0, 1.0)
        check_range(self, "block_size", self.block_size, 1, None)


def inverse_hessian_cholesky(xtx: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp*mean(diag H) I)^-1`` (``U^T U = H^-1``)."""
    h = xtx.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).to(torch.float32)


def live_columns(weight: Tensor, xtx: Tensor) -> Tensor:
    """A float32 copy of ``weight`` with the columns no calibration input reaches
    (``diag(xtx) == 0``) set to zero."""
    w = weight.detach().to(torch.float32).clone()
    w[:, torch.diag(xtx) == 0] = 0
    return w


def act_order(xtx: Tensor) -> Tensor:
    """The columns by decreasing ``diag(xtx)`` (ties in index order)."""
    return torch.argsort(torch.diag(xtx), descending=True, stable=True)


def gptq_codes(weight: Tensor, xtx: Tensor, perm: Tensor, config: GPTQConfig, block: int,
               round_column: Callable[[int, Tensor], tuple[Tensor, Tensor]]) -> Tensor:
    """GPTQ's loop: the columns of ``weight`` (``[out, in]``) in the order ``perm``, each
    rounded by ``round_column(col, upcoming)`` (``upcoming``: the error-updated columns from
    this one to the end of its block of ``block``, this one first; returns the codes and the
    values they decode to), its rounding error spread over the columns not yet rounded
    through the inverse Hessian. Returns the codes ``[out, in]`` (uint8) in column order."""
    out_f, in_f = weight.shape
    w = live_columns(weight, xtx)[:, perm]
    hinv = inverse_hessian_cholesky(xtx[perm][:, perm], config.damp)
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            q, value = round_column(col, w1[:, i:])
            codes[:, col] = q.to(torch.uint8)
            err = (w1[:, i] - value) / h1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes


@register_init("gptq", GPTQConfig, (UniformConfig, GGUFBlockConfig), needs_calibration=True)
def gptq_init(
    weight: Tensor, xtx: Tensor | None, repr_config: ReprConfig, method_config: GPTQConfig
) -> UniformWeight | GGUFBlockWeight:
    """Quantize ``weight`` with GPTQ onto a scalar grid (a uniform grid or a GGUF block type:
    any representation with ``fit_grid``, ``round_column`` and ``set_grid``).

    Without ``act_order`` the per-group grids are fitted to the error-updated weights as each
    group is reached; with it, columns are processed by decreasing ``diag(H)`` and the grids
    are fitted to the original weights first ("static groups"), so every group keeps one grid.
    """
    if xtx is None:
        raise ValueError("GPTQ needs the layer's input statistics (xtx); use 'rtn' without data")
    out_f, in_f = weight.shape
    rep = representation_for(repr_config)(out_f, in_f, repr_config)
    g = rep.group
    grid = (torch.zeros(out_f, in_f // g), torch.zeros(out_f, in_f // g))
    if method_config.act_order:
        grid = rep.fit_grid(live_columns(weight, xtx).reshape(out_f, -1, g))
        perm = act_order(xtx)
        block = method_config.block_size
    else:
        perm = torch.arange(in_f)
        block = max(g, (method_config.block_size // g) * g)

    def round_column(col: int, upcoming: Tensor) -> tuple[Tensor, Tensor]:
        if not method_config.act_order and col % g == 0:
            # blocks are whole groups, so the group's error-updated columns are in upcoming
            fitted = rep.fit_grid(upcoming[:, :g].unsqueeze(1))
            for full, part in zip(grid, fitted, strict=True):
                full[:, col // g] = part[:, 0]
        return rep.round_column(upcoming[:, 0], tuple(t[:, col // g] for t in grid))

    codes = gptq_codes(weight, xtx, perm, method_config, block, round_column)
    rep.set_grid(*grid)
    with torch.no_grad():
        rep.codes.copy_(codes)
    return rep
