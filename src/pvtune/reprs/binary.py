"""Binary (``alpha * sign(W)``) and ternary (BitNet b1.58 absmean) weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pvtune.packing import BitCodec, IntCodec, TritCodec
from pvtune.reprs.base import (
    QuantizedWeight,
    ReprConfig,
    check_group_divides,
    check_int,
    check_range,
    register_representation,
    round_to_fp16,
    uniform_noise,
)
from pvtune.reprs.uniform import FP16_TINY


@dataclass(frozen=True)
class BinaryConfig(ReprConfig):
    """``W = alpha * sign(W)`` with one fp16 ``alpha = mean|W|`` per group of input weights.

    ``group_size=None``: one alpha per output row. Bits/param = ``1 + 16 / group``.
    """

    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.group_size is not None:
            check_int(self, "group_size", self.group_size)
            check_range(self, "group_size", self.group_size, 1, None)

    def check_shape(self, out_features: int, in_features: int) -> None:
        if self.group_size is not None:
            check_group_divides(self, "group_size", self.group_size, in_features)


@dataclass(frozen=True)
class TernaryConfig(BinaryConfig):
    """BitNet b1.58: ``W = gamma * RoundClip(W / gamma, -1, 1)``, ``gamma = mean|W|``.

    One fp16 gamma per group (per output row when ``group_size=None``; BitNet itself uses
    one per tensor). Codes pack five per byte: bits/param = ``1.6 + 16 / group``.
    """


class _ScaledLevels(QuantizedWeight):
    """Shared machinery: integer codes mapped to fixed levels times a per-group scale."""

    levels: tuple[float, ...] = ()
    step_unit_kind = "grid"

    def __init__(self, out_features: int, in_features: int, config: BinaryConfig) -> None:
        super().__init__(out_features, in_features, config)
        self.group = in_features if config.group_size is None else config.group_size
        ngroups = in_features // self.group
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.scale = nn.Parameter(torch.ones(out_features, ngroups))
        self.register_buffer("_levels", torch.tensor(self.levels), persistent=False)

    def _grouped(self, w: Tensor) -> Tensor:
        return w.reshape(self.out_features, -1, self.group)

    def init_from_dense(self, weight: Tensor) -> None:
        alpha = self._grouped(weight).abs().mean(-1)
        alpha = round_to_fp16(alpha.clamp(min=FP16_TINY))
        with torch.no_grad():
            self.scale.copy_(alpha)
        self.encode(weight)

    def forward(self) -> Tensor:
        values = self._levels.to(self.scale.dtype)[self._grouped(self.codes).long()]
        return (self.scale.unsqueeze(-1) * values).reshape(self.out_features, self.in_features)

    def step_unit(self) -> Tensor:
        """The scale (``|alpha|``, half the distance between levels) of each weight's group."""
        with torch.no_grad():
            return self.scale.abs()  # [out, groups]: one unit per group

    def _nearest(self, x: Tensor) -> Tensor:
        """Nearest level index for ``x`` in units of the scale."""
        raise NotImplementedError

    def encode(
        self, target: Tensor, groups: Tensor | None = None, beam_size: int | None = None
    ) -> None:
        target, groups = self._check_inputs(target, groups, beam_size)
        with torch.no_grad():
            x = self._grouped(target) / self.scale.unsqueeze(-1)  # a negative scale flips x
            q = self._nearest(x).reshape(self.codes.shape).to(torch.uint8)
            self.codes.copy_(q if groups is None else torch.where(groups, q, self.codes))

    def stochastic_encode(
        self, target: Tensor, generator: torch.Generator | None = None,
        groups: Tensor | None = None, beam_size: int | None = None,
    ) -> None:
        """Random rounding between the two levels around ``target / scale`` (unbiased inside
        the level range, clamped outside)."""
        target, groups = self._check_inputs(target, groups, beam_size)
        with torch.no_grad():
            lv = self._levels.to(target.dtype)
            x = (self._grouped(target) / self.scale.unsqueeze(-1)).clamp(lv[0], lv[-1])
            lo = (torch.bucketize(x, lv, right=True) - 1).clamp(0, len(lv) - 2)
            frac = (x - lv[lo]) / (lv[lo + 1] - lv[lo])
            noise = uniform_noise(x, generator)
            q = (lo + (noise < frac).long()).reshape(self.codes.shape).to(torch.uint8)
            self.codes.copy_(q if groups is None else torch.where(groups, q, self.codes))


@register_representation("binary")
class BinaryWeight(_ScaledLevels):
    """Sign codes (0 -> -1, 1 -> +1) times a per-group fp16 scale."""

    config_cls = BinaryConfig
    levels = (-1.0, 1.0)

    def _nearest(self, x: Tensor) -> Tensor:
        return (x >= 0).long()

    def bits_per_param(self) -> float:
        return 1.0 + 16.0 / self.group

    def integer_codecs(self) -> dict[str, IntCodec]:
        return {"codes": BitCodec(1)}


@register_representation("ternary")
class TernaryWeight(_ScaledLevels):
    """Ternary codes (0, 1, 2 -> -1, 0, +1) times a per-group fp16 absmean scale."""

    config_cls = TernaryConfig
    levels = (-1.0, 0.0, 1.0)

    def _nearest(self, x: Tensor) -> Tensor:
        return torch.round(x.clamp(-1, 1)).long() + 1

    def bits_per_param(self) -> float:
        return 8.0 / 5.0 + 16.0 / self.group

    def integer_codecs(self) -> dict[str, IntCodec]:
        return {"codes": TritCodec()}
