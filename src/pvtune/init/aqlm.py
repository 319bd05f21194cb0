"""AQLM initialisation (Egiazarian et al. 2024) of additive multi-codebook weights.

Objective: the layer's output error on calibration inputs, ``tr(dW XTX dW^T)``. Starting
from residual k-means codebooks, alternate (a) Adam on codebooks and scales and (b) a sweep
over weight groups that re-picks each group's codes by beam search under the exact
objective, until the relative improvement of a round falls under a tolerance.

The sweep solves, for group ``J`` of every row with the other groups fixed,
``min (w' - c)^T H_JJ (w' - c)`` with ``c = w_J - H_JJ^-1 (dW H)_J``; whitening with the
Cholesky factor of ``H_JJ`` turns this into an ordinary nearest-sum search.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from pvtune.init.registry import register_init
from pvtune.reprs.base import check_int, check_range, round_to_fp16
from pvtune.reprs.codebook import AdditiveWeight, AQLMConfig
from pvtune.reprs.codebook_search import (
    additive_decode,
    beam_search,
    kmeans,
    nearest,
    refine_codes,
)
from pvtune.reprs.uniform import FP16_TINY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AQLMInitConfig:
    """Settings of the alternating optimisation.

    ``max_rounds``: alternations of codebook update and code sweep; ``codebook_steps`` and
    ``lr``: Adam on codebooks and scales per round; ``relative_tolerance``: stop when a round
    improves the relative output error by less than this fraction; ``beam_size``: code search
    width in the sweep.
    """

    max_rounds: int = 3
    codebook_steps: int = 30
    lr: float = 1e-2
    relative_tolerance: float = 0.01
    beam_size: int = 4
    kmeans_iters: int = 10
    kmeans_points: int = 16384

    def __post_init__(self) -> None:
        for f in ("max_rounds", "codebook_steps", "beam_size", "kmeans_iters", "kmeans_points"):
            check_int(self, f, getattr(self, f))
        check_range(self, "max_rounds", self.max_rounds, 0, None)
        check_range(self, "codebook_steps", self.codebook_steps, 0, None)
        check_range(self, "lr", self.lr, 0.0, None)
        check_range(self, "relative_tolerance", self.relative_tolerance, 0.0, None)
        check_range(self, "beam_size", self.beam_size, 1, 64)
        check_range(self, "kmeans_iters", self.kmeans_iters, 0, None)
        check_range(self, "kmeans_points", self.kmeans_points, 1, None)


def output_error(rep: AdditiveWeight, weight: Tensor, xtx: Tensor) -> float:
    """Relative output error ``tr(dW H dW^T) / tr(W H W^T)``."""
    with torch.no_grad():
        dw = rep() - weight
        return float(((dw @ xtx) * dw).sum() / ((weight @ xtx) * weight).sum())


def update_codebooks(rep: AdditiveWeight, weight: Tensor, xtx: Tensor, steps: int, lr: float):
    """Adam on codebooks and scales minimising ``tr(dW H dW^T)`` with codes fixed.

    Keeps the best iterate (rounded to float16 values, the stored precision), so the
    objective never ends above where it started, whatever the learning rate.
    """
    if steps == 0:
        return
    params = [rep.codebooks, rep.scales]
    norm = ((weight @ xtx) * weight).sum().clamp(min=1e-12)
    opt = torch.optim.Adam(params, lr=lr)

    def objective() -> float:
        with torch.no_grad():
            dw = rep() - weight
            return float(((dw @ xtx) * dw).sum() / norm)

    best, best_params = objective(), [p.detach().clone() for p in params]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        wq = rep()
        dw = wq.detach() - weight
        # d/dW tr(dW H dW^T) = 2 dW H: one matmul instead of autograd's three
        grad = dw @ xtx
        value = float((grad * dw).sum() / norm)  # objective at the current iterate
        if value < best:
            best, best_params = value, [p.detach().clone() for p in params]
        wq.backward(grad * (2.0 / norm))
        opt.step()
    with torch.no_grad():
        for p in params:
            p.copy_(round_to_fp16(p))
    if objective() > best:
        with torch.no_grad():
            for p, saved in zip(params, best_params, strict=True):
                p.copy_(round_to_fp16(saved))


def sweep_codes(rep: AdditiveWeight, weight: Tensor, xtx: Tensor, beam_size: int) -> None:
    """One pass over weight groups re-picking codes under the exact output objective.

    A group keeps its codes unless the search lowers the objective, so the objective
    never increases.
    """
    g = rep.config.in_group_size
    with torch.no_grad():
        books = rep.books().detach()
        scale = rep.scales.detach().view(-1, 1)
        wq = rep().detach().clone()
        grad = (wq - weight) @ xtx  # (dW H), kept current as groups change
        codes = rep.codes.long()
        eye = torch.eye(g, dtype=xtx.dtype)
        damp = 1e-6 * torch.diagonal(xtx).mean().clamp(min=1e-12)
        for j in range(rep.in_features // g):
            cols = slice(j * g, (j + 1) * g)
            hjj = xtx[cols, cols] + damp * eye
            chol = torch.linalg.cholesky(hjj)
            target = wq[:, cols] - torch.cholesky_solve(grad[:, cols].T, chol).T
            white_t = (target / scale) @ chol
            white_books = books @ chol
            old = codes[:, j]
            new = refine_codes(white_t, white_books, beam_search(white_t, white_books, beam_size))
            err_new = (additive_decode(white_books, new) - white_t).pow(2).sum(-1)
            err_old = (additive_decode(white_books, old) - white_t).pow(2).sum(-1)
            better = err_new < err_old
            if not better.any():
                continue
            best = torch.where(better.unsqueeze(-1), new, old)
            new_w = scale * additive_decode(books, best)
            delta = new_w - wq[:, cols]
            grad += delta @ xtx[cols, :]
            wq[:, cols] = new_w
            codes[:, j] = best
        rep.codes.copy_(codes.to(rep.codes.dtype))


def residual_kmeans_init(
    weight: Tensor, repr_config: AQLMConfig, method_config: AQLMInitConfig
) -> AdditiveWeight:
    """Per-row RMS scales; codebook m is k-means on what codebooks 1..m-1 left, and the
    codes are the k-means assignments (the later sweeps refine them)."""
    rep = AdditiveWeight(weight.shape[0], weight.shape[1], repr_config)
    gen = torch.Generator().manual_seed(repr_config.seed)
    k = 1 << repr_config.nbits_per_codebook
    with torch.no_grad():
        rms = weight.pow(2).mean(-1).sqrt().clamp(min=FP16_TINY)
        rep.scales.copy_(round_to_fp16(rms).view_as(rep.scales))
        resid = rep._unit_vectors(weight)
        for m in range(repr_config.num_codebooks):
            book = round_to_fp16(kmeans(resid, k, method_config.kmeans_iters, gen,
                                        max_points=method_config.kmeans_points))
            idx, _ = nearest(resid, book)
            resid = resid - book[idx]
            rep.codebooks[m, :, 0, :] = book
            rep.codes.view(-1, repr_config.num_codebooks)[:, m] = idx.to(rep.codes.dtype)
    return rep


@register_init("aqlm", AQLMInitConfig, (AQLMConfig,), needs_calibration=True)
def aqlm_init(
    weight: Tensor, xtx: Tensor | None, repr_config: AQLMConfig, method_config: AQLMInitConfig
) -> AdditiveWeight:
    """Initialise an :class:`AdditiveWeight` for ``weight`` under the output objective."""
    if xtx is None:
        raise ValueError("AQLM initialisation needs the layer's input statistics (xtx)")
    weight = weight.detach().to(torch.float32)
    xtx = xtx.to(torch.float32)
    rep = residual_kmeans_init(weight, repr_config, method_config)
    prev = output_error(rep, weight, xtx)
    log.debug("aqlm init: k-means error %.5f", prev)
    for round_idx in range(method_config.max_rounds):
        update_codebooks(rep, weight, xtx, method_config.codebook_steps, method_config.lr)
        sweep_codes(rep, weight, xtx, method_config.beam_size)
        cur = output_error(rep, weight, xtx)
        log.debug("aqlm init round %d: relative output error %.5f", round_idx, cur)
        if prev - cur < method_config.relative_tolerance * prev:
            break
        prev = cur
    return rep
