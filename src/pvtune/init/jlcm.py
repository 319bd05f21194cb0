"""JLCM's initialisation: rows grouped by their weight statistics, one codebook per group
fitted by k-means with each weight counted by how much its input matters, then the codes
chosen by GPTQ's error feedback onto each row's levels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pvtune.init.gptq import GPTQConfig, act_order, gptq_codes
from pvtune.init.registry import register_init
from pvtune.reprs.base import check_range, round_to_fp16
from pvtune.reprs.grouped_codebook import GroupedCodebookConfig, GroupedCodebookWeight


@dataclass(frozen=True)
class JLCMInitConfig:
    """``error_feedback``: choose the codes column by column as GPTQ does (each rounding
    error spread over the columns not yet rounded through the inverse Hessian, columns by
    decreasing ``diag(H)``), with ``damp`` and ``block_size`` as in
    :class:`~pvtune.init.gptq.GPTQConfig`; off, each weight takes its nearest level. With
    error feedback, ``refit_rounds`` rounds of: codes by error feedback, then the levels
    refitted to them by least squares on the layer's output (:func:`refit_levels`); 0
    keeps the k-means levels. The grouping, bits and number of groups are the
    representation's."""

    error_feedback: bool = True
    damp: float = 0.01
    block_size: int = 128
    refit_rounds: int = 1

    def __post_init__(self) -> None:
        check_range(self, "damp", self.damp, 0.0, 1.0)
        check_range(self, "block_size", self.block_size, 1, None)
        check_range(self, "refit_rounds", self.refit_rounds, 0, None)


@register_init("jlcm", JLCMInitConfig, (GroupedCodebookConfig,), needs_calibration=True)
def jlcm_init(weight: Tensor, xtx: Tensor | None, repr_config: GroupedCodebookConfig,
              method_config: JLCMInitConfig) -> GroupedCodebookWeight:
    """Group the rows and fit each group's levels by k-means weighted by ``diag(E[x x^T])``
    of each weight's column (the squared input it multiplies; uniform without ``xtx``), then
    choose the codes by error feedback (``method_config``; needs ``xtx``)."""
    weight = weight.detach().float()
    importance = torch.ones(weight.shape[1], device=weight.device) if xtx is None \
        else torch.diagonal(xtx).float().clamp(min=0) + 1e-12
    rep = GroupedCodebookWeight(weight.shape[0], weight.shape[1], repr_config).to(weight.device)
    rep.init_weighted(weight, importance)
    if xtx is None or not method_config.error_feedback:
        return rep
    perm = act_order(xtx)
    gptq = GPTQConfig(damp=method_config.damp, block_size=method_config.block_size)
    for round_ in range(max(1, method_config.refit_rounds)):
        books = rep.row_levels()

        def round_column(col: int, upcoming: Tensor, books=books) -> tuple[Tensor, Tensor]:
            q = (upcoming[:, :1] - books).abs_().argmin(-1, keepdim=True)
            return q.squeeze(1), books.gather(1, q).squeeze(1)

        codes = gptq_codes(weight, xtx.float(), perm, gptq, gptq.block_size, round_column)
        with torch.no_grad():
            rep.codes.copy_(codes)
        if round_ < method_config.refit_rounds:
            refit_levels(rep, weight, xtx)
    return rep


def refit_levels(rep: GroupedCodebookWeight, weight: Tensor, xtx: Tensor) -> None:
    """Each group's levels set to minimise the layer's output error
    ``sum_rows (w - q)^T H (w - q)`` over its rows with the codes fixed (``H = xtx``): the
    normal equations ``(sum_r A_r^T H A_r) L = sum_r A_r^T H w_r``, ``A_r`` the one-hot
    codes of row ``r``; a level no weight uses keeps its value. Rounded to float16."""
    h = xtx.double()
    k = rep.config.levels
    books = rep.codebooks.detach().double().clone()
    for g in range(rep.config.groups):
        rows = (rep.row_group == g).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        onehot = torch.nn.functional.one_hot(rep.codes[rows].long(), k).double()
        h_onehot = torch.einsum("ij,rjk->rik", h, onehot)
        gram = torch.einsum("rik,ril->kl", onehot, h_onehot)
        rhs = torch.einsum("rik,ri->k", h_onehot, weight[rows].double())
        used = torch.diagonal(gram) > 0
        sub = gram[used][:, used]
        ridge = 1e-9 * torch.diagonal(sub).mean() * torch.eye(sub.shape[0], dtype=sub.dtype)
        books[g, used] = torch.linalg.solve(sub + ridge, rhs[used])
    with torch.no_grad():
        rep.codebooks.copy_(round_to_fp16(books.float()))
