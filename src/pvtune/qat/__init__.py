"""Quantization-aware training through a named estimator: latent float weights, the hard
projection of a representation in the forward, the estimator's gradient in the backward,
and :func:`freeze_` to turn the result into an ordinary pvtune model.

    quantize_(model, QATConfig(BinaryConfig(), estimator="reste",
                               activations=ActivationQuantConfig(bits=1)))
    schedule = QATSchedule(model, total_steps)   # ReSTE's o from 1 to 3, ...
    ... train, calling schedule.step() after each optimizer step ...
    freeze_(model); save_quantized(model, "out")
"""

from pvtune.qat.config import ActivationQuantConfig, EstimatorConfig, QATConfig
from pvtune.qat.convert import (
    QATSchedule,
    freeze_,
    prepare_qat_,
    qat_layers,
    set_progress_,
)
from pvtune.qat.diagnostics import FlipTracker, layer_bits, reste_layer_indicators
from pvtune.qat.layers import ActivationQuantizer, QATConv2d, QATLinear
from pvtune.qat.projections import Projection, projection_for, register_projection
from pvtune.qat.rules import register_qat_estimator

__all__ = [
    "ActivationQuantConfig",
    "ActivationQuantizer",
    "EstimatorConfig",
    "FlipTracker",
    "Projection",
    "QATConfig",
    "QATConv2d",
    "QATLinear",
    "QATSchedule",
    "freeze_",
    "layer_bits",
    "prepare_qat_",
    "projection_for",
    "register_projection",
    "register_qat_estimator",
    "qat_layers",
    "reste_layer_indicators",
    "set_progress_",
]
