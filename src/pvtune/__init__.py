"""pvtune: train models through discrete parameters (PV-Tuning and the STE family).

The core API::

    from pvtune import quantize_, AQLMConfig, save_quantized
    quantize_(model, AQLMConfig.preset("2x8g8"))
"""

from pvtune.checkpoint import CheckpointError, load_quantized, save_quantized
from pvtune.errors import PvtuneError
from pvtune.estimators import get_estimator, list_estimators, register_estimator
from pvtune.nn import QuantizedLinear, dequantize_, linear_bits_per_param, quantize_
from pvtune.reprs import (
    AQLMConfig,
    BinaryConfig,
    GGUFBlockConfig,
    NMSparseConfig,
    QuantizedWeight,
    ReprConfig,
    TernaryConfig,
    UniformConfig,
    VQConfig,
    register_representation,
)

__version__ = "0.1.0"

__all__ = [
    "AQLMConfig",
    "BinaryConfig",
    "CheckpointError",
    "GGUFBlockConfig",
    "NMSparseConfig",
    "PvtuneError",
    "QuantizedLinear",
    "QuantizedWeight",
    "ReprConfig",
    "TernaryConfig",
    "UniformConfig",
    "VQConfig",
    "dequantize_",
    "get_estimator",
    "linear_bits_per_param",
    "list_estimators",
    "load_quantized",
    "quantize_",
    "register_estimator",
    "register_representation",
    "save_quantized",
]
