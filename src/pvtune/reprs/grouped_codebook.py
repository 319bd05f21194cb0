"""Grouped scalar codebooks (JLCM, Yvinec et al., ICLR 2024): the output rows of a matrix
fall into ``G`` groups of similarly distributed rows; each group has its own codebook of
``2^bits`` learned float16 levels, and each weight stores a ``bits``-bit index into its row's
codebook.

``W[o, i] = codebooks[group[o], codes[o, i]]``. Storage, counted exactly: the codes, the
codebooks (``G * 2^bits`` float16 values) and each row's group (``ceil(log2 G)`` bits per
row; JLCM folds a row permutation into the neighbouring layers instead, which pvtune does
not do, so the group is stored and paid for).

**Grouping** (the paper leaves the method open; pvtune's choice, two of them, an open
registry :data:`GROUPINGS`): k-means on a feature vector per row, standardised over rows:

- ``moments``: the row's mean, standard deviation and largest magnitude;
- ``quantiles``: the row's 5%, 15%, ..., 95% quantiles (the shape and scale of its
  distribution).

**Levels**: per group, 1-D k-means (Lloyd from weighted quantiles) of the group's weights,
each weight counted with an importance (:meth:`GroupedCodebookWeight.init_weighted`; the
calibration inputs' ``diag(E[x x^T])`` of its column, as GPTQ and AQLM weigh errors;
uniform in :meth:`from_dense`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.packing import BitCodec, IntCodec
from pvtune.registry import Registry
from pvtune.reprs.base import (
    QuantizedWeight,
    ReprConfig,
    ceil_log2,
    check_int,
    check_range,
    register_representation,
    round_to_fp16,
)
from pvtune.reprs.codebook_search import kmeans, nearest

# row features by name: ``features(weight [out, in]) -> [out, d]``
GROUPINGS: Registry[str, Callable[[Tensor], Tensor]] = Registry("row grouping")


def register_grouping(name: str):
    """Decorator: ``GroupedCodebookConfig(grouping=name)`` clusters rows on these features."""
    return GROUPINGS.decorator(name)


@register_grouping("moments")
def moment_features(weight: Tensor) -> Tensor:
    """Each row's mean, standard deviation and largest magnitude."""
    return torch.stack([weight.mean(1), weight.std(1, unbiased=False), weight.abs().amax(1)], 1)


@register_grouping("quantiles")
def quantile_features(weight: Tensor) -> Tensor:
    """Each row's 5%, 15%, ..., 95% quantiles."""
    q = torch.linspace(0.05, 0.95, 10, dtype=weight.dtype, device=weight.device)
    return torch.quantile(weight, q, dim=1).T


def group_rows(weight: Tensor, groups: int, grouping: str, iters: int, seed: int) -> Tensor:
    """The group of each row (``[out]``, int64): k-means on standardised row features."""
    features = GROUPINGS.get(grouping)(weight.float())
    features = (features - features.mean(0)) / features.std(0, unbiased=False).clamp(min=1e-12)
    if groups == 1:
        return torch.zeros(weight.shape[0], dtype=torch.long, device=weight.device)
    gen = torch.Generator().manual_seed(seed)
    centroids = kmeans(features.cpu(), groups, iters, gen).to(weight.device)
    return nearest(features, centroids)[0]


def weighted_levels(values: Tensor, importance: Tensor, k: int, iters: int) -> Tensor:
    """``k`` sorted levels minimising ``sum importance * (value - nearest level)^2``: Lloyd's
    algorithm in one dimension, started from weighted quantiles."""
    order = values.argsort()
    v, w = values[order].double(), importance[order].double().clamp(min=1e-12)
    cum = w.cumsum(0) / w.sum()
    targets = (torch.arange(k, dtype=torch.float64, device=v.device) + 0.5) / k
    levels = v[torch.searchsorted(cum, targets).clamp(max=v.numel() - 1)]
    for _ in range(iters):
        mids = (levels[1:] + levels[:-1]) / 2
        assign = torch.bucketize(v, mids)
        mass = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(0, assign, w)
        total = torch.zeros(k, dtype=torch.float64, device=v.device).index_add_(0, assign, w * v)
        levels = torch.where(mass > 0, total / mass.clamp(min=1e-300), levels)
        levels = levels.sort().values
    return levels.float()


@dataclass(frozen=True)
class GroupedCodebookConfig(ReprConfig):
    """``groups`` codebooks of ``2^bits`` float16 levels per matrix, shared by the rows each
    groups together by ``grouping`` (``moments`` or ``quantiles``, see the module
    docstring); ``kmeans_iters`` Lloyd iterations for both clusterings, ``seed`` for the
    row clustering's start. bits/param = ``bits + (16 G 2^bits + out ceil(log2 G)) /
    (out in)``."""

    bits: int = 2
    groups: int = 4
    grouping: str = "moments"
    kmeans_iters: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("bits", "groups", "kmeans_iters", "seed"):
            check_int(self, name, getattr(self, name))
        check_range(self, "bits", self.bits, 1, 8)
        check_range(self, "groups", self.groups, 1, 256)
        check_range(self, "kmeans_iters", self.kmeans_iters, 0, None)
        GROUPINGS.get(self.grouping)

    def check_shape(self, out_features: int, in_features: int) -> None:
        if out_features < self.groups:
            raise ConfigError(f"GroupedCodebookConfig.groups={self.groups} needs at least as "
                              f"many output rows, got {out_features}")

    @property
    def levels(self) -> int:
        """Codebook size ``2^bits``."""
        return 1 << self.bits

    @property
    def name(self) -> str:
        """``2-bit codebooks x 8 row groups (moments)``."""
        return f"{self.bits}-bit codebooks x {self.groups} row groups ({self.grouping})"


@register_representation("grouped_codebook")
class GroupedCodebookWeight(QuantizedWeight):
    """Codes ``[out, in]`` (uint8), ``row_group`` ``[out]`` (uint8), ``codebooks``
    ``[groups, 2^bits]`` (parameter, float16 values)."""

    config_cls = GroupedCodebookConfig
    step_unit_kind = "grid"

    def __init__(self, out_features: int, in_features: int,
                 config: GroupedCodebookConfig) -> None:
        super().__init__(out_features, in_features, config)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("row_group", torch.zeros(out_features, dtype=torch.uint8))
        self.codebooks = nn.Parameter(torch.zeros(config.groups, config.levels))

    def init_from_dense(self, weight: Tensor) -> None:
        self.init_weighted(weight, torch.ones(weight.shape[1], device=weight.device))

    def init_weighted(self, weight: Tensor, importance: Tensor) -> None:
        """Group the rows, fit each group's levels to its weights counted with the
        per-column ``importance`` (``[in]``), and encode."""
        c = self.config
        weight = weight.detach().float()
        labels = group_rows(weight, c.groups, c.grouping, c.kmeans_iters, c.seed)
        books = torch.zeros(c.groups, c.levels, device=weight.device)
        imp = importance.detach().float().to(weight.device).expand_as(weight)
        for g in range(c.groups):
            rows = labels == g
            if not rows.any():  # an empty cluster: the levels of the whole matrix
                rows = torch.ones_like(rows)
            books[g] = weighted_levels(weight[rows].reshape(-1), imp[rows].reshape(-1),
                                       c.levels, c.kmeans_iters)
        with torch.no_grad():
            self.row_group.copy_(labels.to(torch.uint8))
            self.codebooks.copy_(round_to_fp16(books))
        self.encode(weight)

    def row_codebooks(self) -> Tensor:
        """Each row's codebook, ``[out, 2^bits]`` (differentiable)."""
        return self.codebooks.index_select(0, self.row_group.long())

    def row_levels(self) -> Tensor:
        """Each row's levels without gradient (what a discrete step chooses among)."""
        with torch.no_grad():
            return self.row_codebooks().detach()

    def forward(self) -> Tensor:
        return self.row_codebooks().gather(1, self.codes.long())

    def decode_groups(self, index: Tensor) -> Tensor:
        with torch.no_grad():
            rows = self.row_group.long()[index // self.in_features]
            return self.codebooks.detach()[rows, self.codes.view(-1)[index].long()].unsqueeze(-1)

    def _nearest(self, values: Tensor, rows: Tensor) -> Tensor:
        """The nearest level's code of each value under its row's codebook (flat)."""
        books = self.codebooks.detach().to(values.dtype)[self.row_group.long()[rows]]
        return (values.unsqueeze(-1) - books).abs().argmin(-1)

    def encode(self, target: Tensor, groups: Tensor | None = None,
               beam_size: int | None = None) -> None:
        target, groups = self._check_inputs(target, groups, beam_size)
        with torch.no_grad():
            if groups is None:
                index = torch.arange(target.numel(), device=target.device)
            else:
                index = groups.reshape(-1).nonzero().squeeze(1)
            self._encode_at(index, target.reshape(-1)[index])

    def encode_groups(self, index: Tensor, values: Tensor,
                      beam_size: int | None = None) -> None:
        values = self._check_group_values(index, values)
        with torch.no_grad():
            self._encode_at(index, values.reshape(-1))

    def _encode_at(self, index: Tensor, values: Tensor, chunk: int = 1 << 20) -> None:
        for start in range(0, index.numel(), chunk):  # bounded [chunk, 2^bits] distances
            at = index[start:start + chunk]
            q = self._nearest(values[start:start + chunk], at // self.in_features)
            self.codes.view(-1)[at] = q.to(torch.uint8)

    def step_unit(self) -> Tensor:
        """The mean spacing of each row's sorted levels (``[out, 1]``)."""
        with torch.no_grad():
            books = self.codebooks.detach().sort(-1).values
            spacing = (books[:, -1] - books[:, 0]) / max(1, self.config.levels - 1)
            floor = books.abs().amax(-1).clamp(min=1e-8) * 1e-3
            return torch.maximum(spacing, floor)[self.row_group.long()].unsqueeze(-1)

    def change_threshold(self) -> Tensor:
        """Just under half the smallest gap between adjacent levels of each row's codebook
        (``[out, 1]``): a target nearer its weight's level than that is nearer to it than
        to any other level, so its code stays."""
        with torch.no_grad():
            books = self.codebooks.detach().sort(-1).values
            gap = books.diff(dim=-1).amin(-1)  # 2^bits >= 2 levels
            return (gap * (0.5 * (1 - 1e-3)))[self.row_group.long()].unsqueeze(-1)

    def bits_per_param(self) -> float:
        c = self.config
        meta = 16 * c.groups * c.levels + self.out_features * ceil_log2(c.groups)
        return c.bits + meta / (self.out_features * self.in_features)

    def integer_codecs(self) -> dict[str, IntCodec]:
        return {"codes": BitCodec(self.config.bits),
                "row_group": BitCodec(ceil_log2(self.config.groups))}
