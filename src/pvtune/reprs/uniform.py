"""Uniform scalar quantization: ``W = scale * (q - zero)`` per group of input weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.packing import BitCodec, IntCodec
from pvtune.reprs.base import (
    ReprConfig,
    check_group_divides,
    check_int,
    check_range,
    register_representation,
    round_to_fp16,
)
from pvtune.reprs.scalar_grid import ScalarGridWeight

FP16_TINY = 2.0**-14  # smallest normal float16: scales never go below it


@dataclass(frozen=True)
class UniformConfig(ReprConfig):
    """Uniform scalar grid of ``bits`` bits per weight with one fp16 scale per group.

    Asymmetric grids also store an integer zero-point of ``bits`` bits per group
    (bits/param = ``bits + (16 + bits) / group_size``); symmetric grids use the signed
    range ``[-2^(bits-1), 2^(bits-1) - 1]`` (bits/param = ``bits + 16 / group_size``).
    ``group_size=None`` means one group per output row. ``scale_search`` picks, per group,
    the clipping ratio in ``[0.5, 1]`` with the smallest squared error. It is off by default:
    in an early, unrecorded measurement on SmolLM2 the plain min/max grid gave the lower
    perplexity at 3 and 4 bits although its weight error is larger (weight error is a poor
    proxy for perplexity there); no committed benchmark compares the two yet.
    """

    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    scale_search: bool = False

    def __post_init__(self) -> None:
        check_int(self, "bits", self.bits)
        check_range(self, "bits", self.bits, 1, 8)
        if self.group_size is not None:
            check_int(self, "group_size", self.group_size)
            check_range(self, "group_size", self.group_size, 1, None)
        if self.symmetric and self.bits < 2:
            raise ConfigError(
                "UniformConfig.bits must be in [2, 8] when symmetric=True (a 1-bit signed grid "
                f"is {{-1, 0}}); got {self.bits}. Use symmetric=False or BinaryConfig"
            )

    def check_shape(self, out_features: int, in_features: int) -> None:
        if self.group_size is not None:
            check_group_divides(self, "group_size", self.group_size, in_features)

    def group_for(self, in_features: int) -> int:
        """The effective group length for a layer with ``in_features`` inputs."""
        return in_features if self.group_size is None else self.group_size

    @property
    def maxq(self) -> int:
        """Largest integer code."""
        return (1 << self.bits) - 1


def grid_params(w: Tensor, config: UniformConfig) -> tuple[Tensor, Tensor]:
    """Scale and integer zero-point for groups along the last dim of ``w`` (min/max fit).

    ``w`` has shape ``[..., g]``; returns ``scale, zero`` of shape ``[...]``, the scale
    rounded to float16 values.
    """
    maxq = config.maxq
    if config.symmetric:
        half = 1 << (config.bits - 1)
        wmax = w.amax(-1).clamp(min=0)
        wmin = w.amin(-1).clamp(max=0)
        scale = torch.maximum(wmax / (half - 1), -wmin / half)
        zero = torch.full_like(scale, float(half))
    else:
        wmin = w.amin(-1).clamp(max=0)
        wmax = w.amax(-1).clamp(min=0)
        scale = (wmax - wmin) / maxq
    scale = round_to_fp16(torch.where(scale > FP16_TINY, scale, torch.full_like(scale, FP16_TINY)))
    if not config.symmetric:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def quantize_to_grid(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Nearest integer code ``clamp(round(w / scale + zero), 0, maxq)`` (broadcasting)."""
    return torch.clamp(torch.round(w / scale + zero), 0, maxq)


def search_grid_params(w: Tensor, config: UniformConfig, steps: int = 20) -> tuple[Tensor, Tensor]:
    """Per group, the shrink ratio of the min/max range in [0.5, 1] with least squared error."""
    best_scale, best_zero = grid_params(w, config)
    best_err = _grid_error(w, best_scale, best_zero, config.maxq)
    for ratio in torch.linspace(0.5, 1.0, steps)[:-1].tolist():
        scale, zero = grid_params(w * ratio, config)
        err = _grid_error(w, scale, zero, config.maxq)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def _grid_error(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return (s * (quantize_to_grid(w, s, z, maxq) - z) - w).pow(2).sum(-1)


@register_representation("uniform")
class UniformWeight(ScalarGridWeight):
    """Uniform scalar grid with per-group fp16 scales and integer zero-points.

    Codes ``[out, in]`` (uint8), scale ``[out, in/g]`` (parameter), zero ``[out, in/g]``.
    """

    config_cls = UniformConfig
    step_unit_kind = "grid"

    def __init__(self, out_features: int, in_features: int, config: UniformConfig) -> None:
        super().__init__(out_features, in_features, config)
        self.group = config.group_for(in_features)
        ngroups = in_features // self.group
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
        if config.symmetric:  # the zero-point is the constant 2^(bits-1): not stored
            half = torch.full((out_features, ngroups), 1 << (config.bits - 1), dtype=torch.uint8)
            self.register_buffer("zero", half, persistent=False)
        else:
            self.register_buffer("zero", torch.zeros(out_features, ngroups, dtype=torch.uint8))
        self.scale = nn.Parameter(torch.ones(out_features, ngroups))

    def init_from_dense(self, weight: Tensor) -> None:
        self.set_grid(*self.fit_grid(self.grouped(weight)))
        self.encode(weight)

    def fit_grid(self, w_grouped: Tensor) -> tuple[Tensor, Tensor]:
        """``(scale, zero)`` fitted to weights grouped ``[out, groups, group]``."""
        fit = search_grid_params if self.config.scale_search else grid_params
        return fit(w_grouped, self.config)

    def set_grid(self, scale: Tensor, zero: Tensor) -> None:
        """Set per-group scale and integer zero-point (e.g. from GPTQ)."""
        with torch.no_grad():
            self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero.copy_(zero.reshape(self.zero.shape).to(torch.uint8))

    def round_column(self, w: Tensor, grid: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Nearest codes of one column of weights given its groups' ``(scale, zero)``, and
        their decoded values."""
        scale, zero = grid
        q = quantize_to_grid(w, scale, zero, self.config.maxq)
        return q, scale * (q - zero)

    def forward(self) -> Tensor:
        q = self.grouped(self.codes).to(self.scale.dtype)
        z = self.zero.to(self.scale.dtype).unsqueeze(-1)
        return (self.scale.unsqueeze(-1) * (q - z)).reshape(self.out_features, self.in_features)

    def decode_groups(self, index: Tensor) -> Tensor:
        with torch.no_grad():
            grid = self.group_index(index)
            q = self.codes.view(-1)[index].to(self.scale.dtype)
            z = self.zero.view(-1)[grid].to(self.scale.dtype)
            return (self.scale.detach().view(-1)[grid] * (q - z)).unsqueeze(-1)

    def grid_params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.scale.detach(), self.zero.to(dtype)

    @property
    def max_code(self) -> int:
        return self.config.maxq

    def nearest_codes(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        return quantize_to_grid(x, scale, zero, self.config.maxq)

    def code_position(self, x: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        return x / scale + zero

    def step_unit(self) -> Tensor:
        """The grid step (``|scale|``) of each weight's group."""
        with torch.no_grad():
            return self.scale.abs()  # [out, groups]: one unit per group

    def bits_per_param(self) -> float:
        meta = 16 if self.config.symmetric else 16 + self.config.bits
        return self.config.bits + meta / self.group

    def integer_codecs(self) -> dict[str, IntCodec]:
        codecs: dict[str, IntCodec] = {"codes": BitCodec(self.config.bits)}
        if not self.config.symmetric:
            codecs["zero"] = BitCodec(self.config.bits)
        return codecs
