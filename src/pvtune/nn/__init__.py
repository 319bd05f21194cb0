"""Modules and verbs: ``QuantizedLinear``, ``QuantizedConv2d``, ``quantize_``, ``dequantize_``."""

from pvtune.nn.quantize import dequantize_, linear_bits_per_param, quantize_, quantized_layers
from pvtune.nn.quantized_conv import QuantizedConv2d
from pvtune.nn.quantized_linear import QuantizedLinear

__all__ = [
    "QuantizedConv2d",
    "QuantizedLinear",
    "dequantize_",
    "linear_bits_per_param",
    "quantize_",
    "quantized_layers",
]
