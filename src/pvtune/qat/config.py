"""Configs of quantization-aware training: which estimator carries the gradient through a
representation's hard projection, its schedule, and optional activation quantization."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pvtune.errors import ConfigError
from pvtune.qat.projections import projection_for
from pvtune.qat.rules import estimator_names, learns_step
from pvtune.reprs.base import ReprConfig


@dataclass(frozen=True)
class EstimatorConfig:
    """A named estimator and the parameters (and schedules) it needs.

    - ``ste``: identity backward through the hard projection.
    - ``clipped_ste``: identity inside ``|u| <= clip``, zero outside (``u`` is the weight in
      units of its group's scale, or the activation itself).
    - ``approx_sign``: Bi-Real Net's ``2(1 - |u|)`` slope (sign projections only).
    - ``reste``: Rectified STE, the derivative of ``sign(u)|u|^(1/o)``; ``o`` follows
      ``1 + (o_end - o_start)(1 - cos(pi p / 2))`` over training progress ``p`` from
      ``reste_o[0]`` to ``reste_o[1]`` (the paper: 1 to 3), with ReSTE's threshold
      ``reste_t`` and secant width ``reste_m``.
    - ``lsq``: learned step size (LSQ); the step's gradient is scaled by ``lsq_grad_scale``
      (None: LSQ's ``1 / sqrt(group * qmax)``).
    - ``stochastic_rounding``: random rounding in training, nearest at evaluation.
    - ``sr_ste``: SR-STE for N:M masks: dense gradient plus ``sr_ste_decay * (1 - mask) * w``.

    Any name registered with :func:`pvtune.qat.register_qat_estimator` works as well.
    """

    name: str = "ste"
    clip: float = 1.0
    reste_o: tuple[float, float] = (1.0, 3.0)
    reste_t: float = 1.5
    reste_m: float = 0.1
    lsq_grad_scale: float | None = None
    sr_ste_decay: float = 2e-4

    def __post_init__(self) -> None:
        if self.name not in estimator_names():
            raise ConfigError(f"EstimatorConfig.name: unknown estimator {self.name!r}; "
                              f"known: {', '.join(estimator_names())} (add one with "
                              "register_qat_estimator)")
        if not self.clip > 0:
            raise ConfigError(f"EstimatorConfig.clip must be > 0, got {self.clip}")
        o0, o1 = self.reste_o
        if not (o0 >= 1 and o1 >= 1):
            raise ConfigError(f"EstimatorConfig.reste_o: both powers must be >= 1, got "
                              f"{self.reste_o}")
        if not 0 < self.reste_m < self.reste_t:
            raise ConfigError(f"EstimatorConfig: need 0 < reste_m < reste_t, got "
                              f"m={self.reste_m}, t={self.reste_t}")
        if self.lsq_grad_scale is not None and not self.lsq_grad_scale > 0:
            raise ConfigError(f"EstimatorConfig.lsq_grad_scale must be > 0 or None, got "
                              f"{self.lsq_grad_scale}")
        if not self.sr_ste_decay >= 0:
            raise ConfigError(f"EstimatorConfig.sr_ste_decay must be >= 0, got "
                              f"{self.sr_ste_decay}")

    def reste_power(self, progress: float) -> float:
        """ReSTE's ``o`` at training progress ``progress`` in [0, 1] (cosine schedule)."""
        p = min(max(progress, 0.0), 1.0)
        o0, o1 = self.reste_o
        return o0 + (o1 - o0) * (1.0 - math.cos(math.pi * p / 2.0))


def _as_estimator(value: str | EstimatorConfig, owner: str) -> EstimatorConfig:
    if isinstance(value, EstimatorConfig):
        return value
    if isinstance(value, str):
        return EstimatorConfig(value)
    raise ConfigError(f"{owner}.estimator must be a name or an EstimatorConfig, got "
                      f"{type(value).__name__}")


@dataclass(frozen=True)
class ActivationQuantConfig:
    """Quantize a layer's input: ``bits=1`` is ``sign(x)`` (binary networks) through a sign
    estimator; ``bits >= 2`` is an LSQ grid with a learned step (unsigned
    ``[0, 2^bits - 1]`` when ``signed=False``, for inputs after a ReLU)."""

    bits: int = 1
    signed: bool = True
    estimator: str | EstimatorConfig = "ste"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ConfigError(f"ActivationQuantConfig.bits must be an integer in [1, 8], got "
                              f"{self.bits!r}")
        est = _as_estimator(self.estimator, "ActivationQuantConfig")
        object.__setattr__(self, "estimator", est)
        allowed = estimator_names("sign") if self.bits == 1 else \
            tuple(n for n in estimator_names("round") if learns_step(n))
        if est.name not in allowed:
            what = "sign activations" if self.bits == 1 else f"{self.bits}-bit activations"
            raise ConfigError(f"ActivationQuantConfig: estimator {est.name!r} does not apply to "
                              f"{what}; use one of {', '.join(allowed)}")
        if self.bits == 1 and not self.signed:
            raise ConfigError("ActivationQuantConfig: 1-bit activations are sign(x): signed")

    @property
    def qrange(self) -> tuple[int, int]:
        """The integer range of an n-bit grid."""
        if self.signed:
            return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1
        return 0, (1 << self.bits) - 1


@dataclass(frozen=True)
class QATConfig:
    """Train a representation through latent float weights: the forward applies the
    representation's hard projection through ``estimator``; :func:`pvtune.qat.freeze_` turns
    the result into codes. ``activations`` optionally quantizes every layer's input.

    ``quantize_(model, QATConfig(BinaryConfig(), estimator="reste"))`` prepares a model."""

    representation: ReprConfig
    estimator: str | EstimatorConfig = "ste"
    activations: ActivationQuantConfig | None = None
    conv: bool = field(default=True)

    def __post_init__(self) -> None:
        if not isinstance(self.representation, ReprConfig):
            raise ConfigError(f"QATConfig.representation must be a representation config "
                              f"(BinaryConfig, UniformConfig, ...), got "
                              f"{type(self.representation).__name__}")
        object.__setattr__(self, "estimator", _as_estimator(self.estimator, "QATConfig"))
        if self.activations is not None and not isinstance(self.activations,
                                                           ActivationQuantConfig):
            raise ConfigError("QATConfig.activations must be an ActivationQuantConfig or None")
        projection_for(self.representation).check_estimator(self.estimator)
