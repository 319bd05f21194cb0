"""Modules and verbs: ``QuantizedLinear``, ``quantize_``, ``dequantize_``."""

from pvtune.nn.quantize import dequantize_, linear_bits_per_param, quantize_, quantized_layers
from pvtune.nn.quantized_linear import QuantizedLinear

__all__ = [
    "QuantizedLinear",
    "dequantize_",
    "linear_bits_per_param",
    "quantize_",
    "quantized_layers",
]
