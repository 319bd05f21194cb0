"""Layers that train through a hard projection: latent float weights, a projected forward,
and an optional input quantizer. :func:`pvtune.qat.freeze_` turns them into
:class:`~pvtune.nn.QuantizedLinear` / :class:`~pvtune.nn.QuantizedConv2d`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvtune.errors import CheckpointError
from pvtune.estimators import LearnedStepQuantize
from pvtune.nn.input_quantizers import DEFAULT_KIND, register_input_quantizer
from pvtune.qat.config import ActivationQuantConfig, EstimatorConfig, QATConfig
from pvtune.qat.projections import Projection, projection_for, sign_estimate


@register_input_quantizer(DEFAULT_KIND)
class ActivationQuantizer(nn.Module):
    """Quantizes a layer's input: ``sign(x)`` through a sign estimator (``bits=1``), or an LSQ
    grid whose step is learned and initialised from the first training batch
    (``2 mean|x| / sqrt(qmax)``, LSQ's rule)."""

    def __init__(self, config: ActivationQuantConfig) -> None:
        super().__init__()
        self.config = config
        self.progress = 0.0
        if config.bits > 1:
            self.step = nn.Parameter(torch.ones(()))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: Tensor) -> Tensor:
        if self.config.bits == 1:
            return sign_estimate(x, self.config.estimator, self.progress)
        lo, hi = self.config.qrange
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                self.step.copy_(2 * x.detach().abs().mean() / math.sqrt(max(hi, 1)) + 1e-8)
                self.initialized.fill_(True)
        scale = self.config.estimator.lsq_grad_scale or 1.0 / math.sqrt(x[0].numel() * hi)
        return LearnedStepQuantize.apply(x, self.step.abs() + 1e-12, lo, hi, scale)

    def extra_repr(self) -> str:
        return f"bits={self.config.bits}, estimator={self.config.estimator.name}"

    def to_spec(self) -> dict[str, Any]:
        """A checkpoint's record of this quantizer (its learned step is in the state dict)."""
        cfg = self.config
        return {"bits": cfg.bits, "signed": cfg.signed,
                "estimator": dataclasses.asdict(cfg.estimator)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ActivationQuantizer:
        """The (untrained) quantizer a checkpoint record describes."""
        try:
            est = dict(spec["estimator"])
            est["reste_o"] = tuple(est.get("reste_o", (1.0, 3.0)))
            return cls(ActivationQuantConfig(bits=spec["bits"], signed=spec["signed"],
                                             estimator=EstimatorConfig(**est)))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"bad activation quantizer record {spec!r}: {err}") from None


class QATLayer(nn.Module):
    """Shared machinery: ``weight`` is the latent float weight, ``projection`` its hard
    projection, ``progress`` (0 to 1) drives the estimator's schedule."""

    weight: nn.Parameter
    projection: Projection

    def _setup(self, weight: Tensor, bias: Tensor | None, config: QATConfig) -> None:
        self.config = config
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        flat = self.weight.reshape(self.weight.shape[0], -1)
        proj_cls = projection_for(config.representation)
        self.projection = proj_cls(config.representation, config.estimator, *flat.shape)
        self.projection.init_from(flat.detach())
        self.input_quantizer = (None if config.activations is None
                                else ActivationQuantizer(config.activations))
        self.progress = 0.0

    def flat_latent(self) -> Tensor:
        """The latent weight as the projection sees it: ``[out, in]``."""
        return self.weight.reshape(self.weight.shape[0], -1)

    def quantized_weight(self) -> Tensor:
        """The projected (discrete) weight, shaped like ``weight``, with the estimator's
        gradient to the latent weight."""
        return self.projection(self.flat_latent(), self.progress).reshape(self.weight.shape)

    def codes(self) -> Tensor:
        """The discrete state of the projected weight (signs, levels or mask)."""
        return self.projection.codes(self.flat_latent().detach())

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1], for the estimator's schedule."""
        self.progress = float(progress)
        if self.input_quantizer is not None:
            self.input_quantizer.progress = float(progress)

    def _input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)


class QATLinear(QATLayer):
    """``nn.Linear`` trained through ``config``'s hard projection and estimator."""

    def __init__(self, linear: nn.Linear, config: QATConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._setup(linear.weight, linear.bias, config)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"representation={self.config.representation.type_name}, "
                f"estimator={self.config.estimator.name}")


class QATConv2d(QATLayer):
    """``nn.Conv2d`` trained through ``config``'s hard projection; the weight is projected as
    ``[out, in/groups * kh * kw]`` (groups of the representation run along that row)."""

    def __init__(self, conv: nn.Conv2d, config: QATConfig) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QATConv2d supports padding_mode='zeros' only, got "
                             f"{conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            raise ValueError("QATConv2d needs numeric padding, not "
                             f"padding={conv.padding!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self.groups = conv.groups
        self._setup(conv.weight, conv.bias, config)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(self._input(x), self.quantized_weight(), self.bias, self.stride,
                        self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"representation={self.config.representation.type_name}, "
                f"estimator={self.config.estimator.name}")
