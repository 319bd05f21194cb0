"""N:M structured sparsity: the mask is the discrete part, the kept values continuous."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pvtune.packing import BitCodec, IntCodec
from pvtune.reprs.base import (
    QuantizedWeight,
    ReprConfig,
    check_group_divides,
    check_int,
    check_range,
    register_representation,
)


@dataclass(frozen=True)
class NMSparseConfig(ReprConfig):
    """Keep ``n`` of every ``m`` consecutive input weights (2:4 by default).

    Bits/param = ``(n * value_bits + ceil(log2(C(m, n)))) / m``: the kept values plus the
    index of the mask pattern. (Checkpoints store the mask as one bit per weight.)
    """

    n: int = 2
    m: int = 4
    value_bits: int = 16

    def __post_init__(self) -> None:
        check_int(self, "m", self.m)
        check_int(self, "n", self.n)
        check_range(self, "m", self.m, 2, None)
        check_range(self, "n", self.n, 1, self.m - 1)
        check_range(self, "value_bits", self.value_bits, 1, 32)

    def check_shape(self, out_features: int, in_features: int) -> None:
        check_group_divides(self, "m", self.m, in_features)


@register_representation("nm_sparse")
class NMSparseWeight(QuantizedWeight):
    """``W = mask * values``; ``mask`` ``[out, in]`` (uint8 0/1), ``values`` a parameter."""

    config_cls = NMSparseConfig

    def __init__(self, out_features: int, in_features: int, config: NMSparseConfig) -> None:
        super().__init__(out_features, in_features, config)
        self.register_buffer("mask", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.values = nn.Parameter(torch.zeros(out_features, in_features))

    @property
    def code_group_size(self) -> int:
        return self.config.m

    def init_from_dense(self, weight: Tensor) -> None:
        with torch.no_grad():
            self.values.copy_(weight)
        self.encode(weight)

    def forward(self) -> Tensor:
        return self.values * self.mask.to(self.values.dtype)

    def encode(
        self, target: Tensor, groups: Tensor | None = None, beam_size: int | None = None
    ) -> None:
        """Optimal mask for fixed values: keep the ``n`` entries of each block with the largest
        ``t^2 - (v - t)^2`` (the error saved by keeping ``v`` instead of 0)."""
        target, groups = self._check_target(target), self._check_groups(groups)
        with torch.no_grad():
            gain = target.pow(2) - (self.values - target).pow(2)
            blocks = gain.reshape(*self.groups_shape, self.config.m)
            keep = blocks.topk(self.config.n, dim=-1).indices
            mask = torch.zeros_like(blocks, dtype=torch.uint8).scatter_(-1, keep, 1)
            if groups is not None:
                mask = torch.where(groups.unsqueeze(-1), mask, self.mask.view_as(mask))
            self.mask.copy_(mask.reshape(self.mask.shape))

    def bits_per_param(self) -> float:
        c = self.config
        return (c.n * c.value_bits + math.ceil(math.log2(math.comb(c.m, c.n)))) / c.m

    def integer_codecs(self) -> dict[str, IntCodec]:
        return {"mask": BitCodec(1)}

    @property
    def code_buffers(self) -> tuple[str, ...]:
        return ("mask",)
