"""Hard projections of latent float weights onto a representation, differentiable through a
named estimator, and their frozen form (the representation's codes and parameters).

Each projection sees the weight as ``[out, in]`` (a convolution's ``[out, in/groups * kh *
kw]``) and is a module, so parameters an estimator learns (LSQ's step) train with the
model. The forward of a projection equals, bit for bit, the decoded weight of what
:meth:`Projection.freeze` returns, so a frozen model computes what the trained one did.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.estimators import (
    LearnedStepQuantize,
    StraightThrough,
    nm_mask,
)
from pvtune.qat.rules import estimator_names, learns_step, rule
from pvtune.registry import Registry
from pvtune.reprs.base import QuantizedWeight, ReprConfig, representation_for, round_to_fp16
from pvtune.reprs.binary import BinaryConfig, BinaryWeight, TernaryConfig, TernaryWeight
from pvtune.reprs.sparse import NMSparseConfig, NMSparseWeight
from pvtune.reprs.uniform import FP16_TINY, UniformConfig, UniformWeight, grid_params

if TYPE_CHECKING:
    from pvtune.qat.config import EstimatorConfig


def fp16_ste(x: Tensor) -> Tensor:
    """``x`` rounded to float16 values (kept in its dtype), identity gradient."""
    return StraightThrough.apply(x, round_to_fp16)


def sign_estimate(u: Tensor, est: EstimatorConfig, progress: float) -> Tensor:
    """``sign(u)`` (+-1, sign(0) = +1) with the backward of the estimator ``est`` (its
    registered ``sign`` rule, :mod:`pvtune.qat.rules`)."""
    return rule("sign", est.name)(u, est, progress)


def round_estimate(u: Tensor, lo: float, hi: float, est: EstimatorConfig,
                   training: bool) -> Tensor:
    """``round(clamp(u, lo, hi))`` with the backward of the estimator ``est`` (its registered
    ``round`` rule); a learned-step estimator (LSQ) is its projection's own business."""
    fn = rule("round", est.name)
    if not callable(fn):
        raise ConfigError(f"estimator {est.name!r} learns its step: its projection applies it")
    return fn(u, lo, hi, est, training)


class Projection(nn.Module):
    """Base: the hard projection of a representation for ``[out, in]`` latent weights."""

    kind: str = "round"  # which estimator rules apply (pvtune.qat.rules.KINDS)

    def __init__(self, config: ReprConfig, est: EstimatorConfig, out_features: int,
                 in_features: int) -> None:
        super().__init__()
        type(self).check_estimator(est)
        config.check_shape(out_features, in_features)
        self.config, self.est = config, est
        self.out_features, self.in_features = out_features, in_features

    @classmethod
    def check_estimator(cls, est: EstimatorConfig) -> None:
        """Raise a :class:`ConfigError` unless ``est`` applies to this projection."""
        if est.name not in cls.estimator_choices():
            raise ConfigError(f"estimator {est.name!r} does not apply to {cls.describe()}; "
                              f"use one of: {', '.join(cls.estimator_choices())}")

    @classmethod
    def estimator_choices(cls) -> tuple[str, ...]:
        """The estimators that apply (those registered for this projection's kind)."""
        return estimator_names(cls.kind)

    @classmethod
    def describe(cls) -> str:
        """What this projection projects onto, for messages."""
        return cls.__name__.removesuffix("Projection").lower() + " weights"

    def init_from(self, latent: Tensor) -> None:
        """Initialise learned projection parameters (an LSQ step) from the latent weights."""

    def forward(self, latent: Tensor, progress: float = 0.0) -> Tensor:
        raise NotImplementedError

    def codes(self, latent: Tensor) -> Tensor:
        """The discrete state the latent weights project to (signs, levels, masks), for
        counting flips between steps."""
        raise NotImplementedError

    def freeze(self, latent: Tensor) -> QuantizedWeight:
        """The representation whose decoded weight equals ``self(latent)`` (eval mode)."""
        raise NotImplementedError


class _Grouped(Projection):
    """Projections with one scale per group of ``group_size`` input weights."""

    def __init__(self, config, est, out_features, in_features) -> None:
        super().__init__(config, est, out_features, in_features)
        size = getattr(config, "group_size", None)
        self.group = in_features if size is None else size

    def grouped(self, w: Tensor) -> Tensor:
        """``w`` as ``[out, groups, group]``."""
        return w.reshape(self.out_features, -1, self.group)

    def absmean(self, w: Tensor) -> Tensor:
        """fp16 ``mean|w|`` per group (at least float16's smallest normal), identity grad."""
        return fp16_ste(self.grouped(w).abs().mean(-1).clamp(min=FP16_TINY))


class BinaryProjection(_Grouped):
    """``alpha * sign(w)`` with ``alpha = mean|w|`` per group (XNOR-Net); the estimator acts
    on ``u = w / alpha`` (so ``clip`` and ReSTE's thresholds are in units of the scale), and
    ``alpha`` gets its own gradient from ``w``."""

    kind = "sign"

    def _parts(self, latent: Tensor, progress: float) -> tuple[Tensor, Tensor]:
        alpha = self.absmean(latent)
        u = self.grouped(latent) / alpha.detach().unsqueeze(-1)
        return alpha, sign_estimate(u, self.est, progress)

    def forward(self, latent: Tensor, progress: float = 0.0) -> Tensor:
        alpha, signs = self._parts(latent, progress)
        return (alpha.unsqueeze(-1) * signs).reshape(self.out_features, self.in_features)

    def codes(self, latent: Tensor) -> Tensor:
        return latent >= 0

    def freeze(self, latent: Tensor) -> QuantizedWeight:
        rep = BinaryWeight(self.out_features, self.in_features, self.config)
        with torch.no_grad():
            rep.scale.copy_(self.absmean(latent))
            rep.codes.copy_((latent >= 0).to(torch.uint8))
        return rep


class _LevelGrid(_Grouped):
    """Integer levels ``[lo, hi]`` times a per-group fp16 step: absmean-derived, or learned
    by LSQ (then a parameter)."""

    lo, hi = -1, 1

    def __init__(self, config, est, out_features, in_features) -> None:
        super().__init__(config, est, out_features, in_features)
        self.learned_step = learns_step(est.name)
        if self.learned_step:
            self.step = nn.Parameter(torch.ones(out_features, in_features // self.group))

    def _lsq_init(self, latent: Tensor) -> Tensor:
        """LSQ's initial step ``2 mean|w| / sqrt(hi)``."""
        return 2 * self.grouped(latent).abs().mean(-1) / math.sqrt(max(self.hi, 1))

    def init_from(self, latent: Tensor) -> None:
        if self.learned_step:
            with torch.no_grad():
                self.step.copy_(round_to_fp16(self._lsq_init(latent).clamp(min=FP16_TINY)))

    def _fixed_step(self, latent: Tensor) -> Tensor:
        raise NotImplementedError

    def _step_levels(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """Per-group fixed step ``[out, groups]`` and the integer levels ``[out, groups,
        group]`` as floats, with the estimator's gradient (not LSQ)."""
        step = self._fixed_step(latent)
        u = self.grouped(latent) / step.detach().unsqueeze(-1)
        return step, round_estimate(u, self.lo, self.hi, self.est, self.training)

    def forward(self, latent: Tensor, progress: float = 0.0) -> Tensor:
        w = self.grouped(latent)
        if self.learned_step:  # LSQ's own product, so the step gets its gradient
            step = fp16_ste(self.step.abs().clamp(min=FP16_TINY))
            scale = self.est.lsq_grad_scale or 1.0 / math.sqrt(self.group * max(self.hi, 1))
            out = LearnedStepQuantize.apply(w, step.unsqueeze(-1), self.lo, self.hi, scale)
            return out.reshape(self.out_features, self.in_features)
        step, levels = self._step_levels(latent)
        return (step.unsqueeze(-1) * levels).reshape(self.out_features, self.in_features)

    def _frozen_levels(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            w = self.grouped(latent)
            if self.learned_step:
                step = round_to_fp16(self.step.abs().clamp(min=FP16_TINY))
            else:
                step = self._fixed_step(latent)
            return step, torch.round((w / step.unsqueeze(-1)).clamp(self.lo, self.hi))

    def codes(self, latent: Tensor) -> Tensor:
        return self._frozen_levels(latent)[1].to(torch.int16)


class TernaryProjection(_LevelGrid):
    """BitNet b1.58: ``gamma * RoundClip(w / gamma, -1, 1)``, ``gamma = mean|w|`` per group
    (or a step learned by LSQ)."""

    kind = "round"

    def _fixed_step(self, latent: Tensor) -> Tensor:
        return self.absmean(latent)

    def freeze(self, latent: Tensor) -> QuantizedWeight:
        step, levels = self._frozen_levels(latent)
        rep = TernaryWeight(self.out_features, self.in_features, self.config)
        with torch.no_grad():
            rep.scale.copy_(step)
            rep.codes.copy_((levels + 1).reshape(rep.codes.shape).to(torch.uint8))
        return rep


class UniformProjection(_LevelGrid):
    """A ``bits``-bit uniform grid. With ``lsq``: a symmetric grid ``[-2^(b-1), 2^(b-1) - 1]``
    with a learned step; otherwise the min/max grid of the latent weights (scale and
    zero-point refitted every step, no gradient), rounded through the estimator."""

    kind = "round"

    def __init__(self, config: UniformConfig, est, out_features, in_features) -> None:
        if learns_step(est.name) and not config.symmetric:
            raise ConfigError("LSQ learns a symmetric grid: use UniformConfig(symmetric=True) "
                              "with estimator 'lsq'")
        if config.scale_search:
            raise ConfigError("UniformConfig.scale_search does not apply to training "
                              "(the grid is refitted every step): set it to False")
        half = 1 << (config.bits - 1)
        self.lo, self.hi = -half, half - 1
        super().__init__(config, est, out_features, in_features)

    def _grid(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return grid_params(self.grouped(latent.detach()), self.config)

    def _step_levels(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        scale, zero = self._grid(latent)
        u = self.grouped(latent) / scale.unsqueeze(-1) + zero.unsqueeze(-1)
        q = round_estimate(u, 0, self.config.maxq, self.est, self.training)
        return scale, q - zero.unsqueeze(-1)

    def codes(self, latent: Tensor) -> Tensor:
        if self.learned_step:
            return super().codes(latent)
        scale, zero = self._grid(latent)
        u = self.grouped(latent.detach()) / scale.unsqueeze(-1) + zero.unsqueeze(-1)
        return torch.round(u.clamp(0, self.config.maxq)).to(torch.int16)

    def freeze(self, latent: Tensor) -> QuantizedWeight:
        rep = UniformWeight(self.out_features, self.in_features, self.config)
        if self.learned_step:
            step, levels = self._frozen_levels(latent)
            half = torch.full_like(step, float(-self.lo))
            rep.set_grid(step, half)
            codes = levels - self.lo
        else:
            scale, zero = self._grid(latent)
            rep.set_grid(scale, zero)
            codes = self.codes(latent)
        with torch.no_grad():
            rep.codes.copy_(codes.reshape(rep.codes.shape).to(torch.uint8))
        return rep


class NMSparseProjection(Projection):
    """Keep the ``n`` largest |w| of every ``m`` (values rounded to fp16): plain ``ste`` passes
    the dense gradient to every weight; ``sr_ste`` adds SR-STE's decay of pruned weights."""

    kind = "mask"

    def mask(self, latent: Tensor) -> Tensor:
        """The boolean N:M mask of ``latent``."""
        return nm_mask(latent.detach(), self.config.n, self.config.m)

    def forward(self, latent: Tensor, progress: float = 0.0) -> Tensor:
        return rule("mask", self.est.name)(fp16_ste(latent), self.mask(latent), self.est)

    def codes(self, latent: Tensor) -> Tensor:
        return self.mask(latent)

    def freeze(self, latent: Tensor) -> QuantizedWeight:
        rep = NMSparseWeight(self.out_features, self.in_features, self.config)
        m, n = self.config.m, self.config.n
        with torch.no_grad():
            blocks = round_to_fp16(latent.detach()).reshape(self.out_features, -1, m)
            keep = self.mask(latent).reshape(blocks.shape).nonzero()[:, 2]
            keep = keep.reshape(self.out_features, -1, n)  # ascending within each block
            rep.values.copy_(blocks.gather(-1, keep))
            rep.pattern.copy_(rep.pattern_index(keep).to(rep.pattern.dtype))
        return rep


class GenericProjection(Projection):
    """Any other representation (GGUF blocks, codebooks): fitted to the latent weights from
    scratch on every forward (round to nearest), plain straight-through gradient."""

    @classmethod
    def estimator_choices(cls) -> tuple[str, ...]:
        return ("ste",)

    @classmethod
    def describe(cls) -> str:
        return "this representation (only the plain straight-through estimator)"

    def _fit(self, latent: Tensor) -> QuantizedWeight:
        with torch.no_grad():
            return representation_for(self.config).from_dense(latent.detach(), self.config)

    def forward(self, latent: Tensor, progress: float = 0.0) -> Tensor:
        decoded = self._fit(latent)().detach()
        return StraightThrough.apply(latent, lambda _: decoded.to(latent.dtype))

    def codes(self, latent: Tensor) -> Tensor:
        rep = self._fit(latent)
        return torch.cat([b.reshape(-1).to(torch.int64) for b in rep.buffers()
                          if not b.is_floating_point()])

    def freeze(self, latent: Tensor) -> QuantizedWeight:
        return self._fit(latent)


PROJECTIONS: Registry[type, type[Projection]] = Registry("QAT projection")


def register_projection(config_type: type[ReprConfig], *,
                        overwrite: bool = False) -> Callable[[type[Projection]],
                                                             type[Projection]]:
    """Decorator: the hard projection QAT uses for representations of ``config_type``
    (others get :class:`GenericProjection`)."""
    return PROJECTIONS.decorator(config_type, overwrite=overwrite)


for _config, _projection in ((TernaryConfig, TernaryProjection), (BinaryConfig, BinaryProjection),
                             (UniformConfig, UniformProjection),
                             (NMSparseConfig, NMSparseProjection)):
    register_projection(_config)(_projection)


def projection_for(config: ReprConfig) -> type[Projection]:
    """The projection class registered for the exact type of ``config`` (TernaryConfig
    derives from BinaryConfig yet has its own), :class:`GenericProjection` otherwise."""
    return PROJECTIONS.get(type(config)) if type(config) in PROJECTIONS else GenericProjection
