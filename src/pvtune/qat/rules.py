"""How an estimator carries the gradient through each kind of hard projection in QAT: open
registries, one per kind, so an estimator defined outside pvtune trains like a built-in one.

* ``sign``: ``rule(u, est, progress) -> sign(u)`` (values +-1, sign(0) = +1) with the
  estimator's backward; ``u`` is the weight in units of its group's scale (or the
  activation), ``progress`` the share of training done (for schedules such as ReSTE's).
* ``round``: ``rule(u, lo, hi, est, training) -> round(clamp(u, lo, hi))`` with the
  estimator's backward (``training`` False: evaluation, deterministic). A
  :class:`LearnedStep` entry instead marks an estimator whose projection learns its step
  (LSQ), which the projection implements.
* ``mask``: ``rule(w, mask, est) -> w * mask`` with the estimator's backward.

``est`` is the layer's :class:`~pvtune.qat.EstimatorConfig` (its name and parameters)::

    @register_qat_estimator("my_sign", "sign")
    def my_sign(u, est, progress):
        return MySignFunction.apply(u)  # an autograd.Function: sign forward, your backward

    quantize_(model, QATConfig(BinaryConfig(), estimator="my_sign"))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pvtune.estimators import (
    ApproxSign,
    ClippedStraightThrough,
    RectifiedStraightThrough,
    SparseRefinedStraightThrough,
    StochasticRound,
    StraightThrough,
    binary_sign,
)
from pvtune.registry import Registry

if TYPE_CHECKING:
    from pvtune.qat.config import EstimatorConfig

KINDS = ("sign", "round", "mask")
RULES: dict[str, Registry[str, Callable]] = {
    kind: Registry(f"estimator for {kind} projections") for kind in KINDS}


@dataclass(frozen=True)
class LearnedStep:
    """A ``round`` estimator whose projection learns its step size (LSQ)."""


def register_qat_estimator(name: str, kind: str, *,
                           overwrite: bool = False) -> Callable[[Callable], Callable]:
    """Decorator making ``name`` usable as ``EstimatorConfig(name)`` on projections of
    ``kind`` (``sign``, ``round`` or ``mask``; see the module docstring for each signature)."""
    if kind not in RULES:
        raise ValueError(f"unknown projection kind {kind!r}; known: {', '.join(KINDS)}")
    return RULES[kind].decorator(name, overwrite=overwrite)


def estimator_names(kind: str | None = None) -> tuple[str, ...]:
    """The estimators registered for ``kind`` (every kind: None), in registration order."""
    kinds = KINDS if kind is None else (kind,)
    return tuple(dict.fromkeys(n for k in kinds for n in RULES[k]))


def rule(kind: str, name: str) -> Callable | LearnedStep:
    """The ``kind`` rule registered under ``name`` (an error lists the known ones)."""
    return RULES[kind].get(name)


def learns_step(name: str) -> bool:
    """Whether the ``round`` estimator ``name`` has its projection learn the step (LSQ)."""
    return name in RULES["round"] and isinstance(RULES["round"].get(name), LearnedStep)


# ---------------------------------------------------------------------------------------
# the built-in rules


@register_qat_estimator("ste", "sign")
def _sign_ste(u: Tensor, est: EstimatorConfig, progress: float) -> Tensor:
    return StraightThrough.apply(u, binary_sign)


@register_qat_estimator("clipped_ste", "sign")
def _sign_clipped(u: Tensor, est: EstimatorConfig, progress: float) -> Tensor:
    return ClippedStraightThrough.apply(u, binary_sign, float(est.clip))


@register_qat_estimator("approx_sign", "sign")
def _sign_approx(u: Tensor, est: EstimatorConfig, progress: float) -> Tensor:
    return ApproxSign.apply(u)


@register_qat_estimator("reste", "sign")
def _sign_reste(u: Tensor, est: EstimatorConfig, progress: float) -> Tensor:
    return RectifiedStraightThrough.apply(u, est.reste_power(progress), est.reste_t, est.reste_m)


def _roundclip(lo: float, hi: float) -> Callable[[Tensor], Tensor]:
    return lambda v: torch.round(v.clamp(lo, hi))


@register_qat_estimator("ste", "round")
def _round_ste(u: Tensor, lo: float, hi: float, est: EstimatorConfig, training: bool) -> Tensor:
    """The gradient passes through the clamp too (BitNet's RoundClip)."""
    return StraightThrough.apply(u, _roundclip(lo, hi))


@register_qat_estimator("clipped_ste", "round")
def _round_clipped(u: Tensor, lo: float, hi: float, est: EstimatorConfig,
                   training: bool) -> Tensor:
    """Zero gradient outside ``[lo - clip + 1/2, hi + clip - 1/2]`` (clip 1: the grid +- 1/2)."""
    center, half = (lo + hi) / 2, (hi - lo) / 2 + est.clip - 0.5
    clip = _roundclip(lo, hi)
    return center + ClippedStraightThrough.apply(u - center, lambda v: clip(v + center) - center,
                                                 half)


@register_qat_estimator("stochastic_rounding", "round")
def _round_stochastic(u: Tensor, lo: float, hi: float, est: EstimatorConfig,
                      training: bool) -> Tensor:
    """Random rounding while training, nearest at evaluation."""
    if not training:
        return StraightThrough.apply(u, _roundclip(lo, hi))
    clamped = u.clamp(lo, hi)
    return StochasticRound.apply(clamped, torch.rand_like(clamped)).clamp(lo, hi)


RULES["round"].register("lsq", LearnedStep())


@register_qat_estimator("ste", "mask")
def _mask_ste(w: Tensor, mask: Tensor, est: EstimatorConfig) -> Tensor:
    return StraightThrough.apply(w, lambda v: v * mask)


@register_qat_estimator("sr_ste", "mask")
def _mask_sr_ste(w: Tensor, mask: Tensor, est: EstimatorConfig) -> Tensor:
    return SparseRefinedStraightThrough.apply(w, mask, float(est.sr_ste_decay))
