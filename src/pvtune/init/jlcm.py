"""JLCM's initialisation: rows grouped by their weight statistics, then one codebook per
group fitted by k-means with each weight counted by how much its input matters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pvtune.init.registry import register_init
from pvtune.reprs.grouped_codebook import GroupedCodebookConfig, GroupedCodebookWeight


@dataclass(frozen=True)
class JLCMInitConfig:
    """JLCM has no settings beyond its representation's (groups, grouping, bits)."""


@register_init("jlcm", JLCMInitConfig, (GroupedCodebookConfig,), needs_calibration=True)
def jlcm_init(weight: Tensor, xtx: Tensor | None, repr_config: GroupedCodebookConfig,
              method_config: JLCMInitConfig) -> GroupedCodebookWeight:
    """Group the rows and fit each group's levels by k-means weighted by ``diag(E[x x^T])``
    of each weight's column (the squared input it multiplies); uniform without ``xtx``."""
    weight = weight.detach().float()
    importance = torch.ones(weight.shape[1], device=weight.device) if xtx is None \
        else torch.diagonal(xtx).float().clamp(min=0) + 1e-12
    rep = GroupedCodebookWeight(weight.shape[0], weight.shape[1], repr_config).to(weight.device)
    rep.init_weighted(weight, importance)
    return rep
