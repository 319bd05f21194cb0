"""Compiled CPU kernels (numba) for running compressed weights without decoding them."""

from pvtune.kernels.lut import AdditiveLUTOperands, additive_lut_matmul, lut_available

__all__ = ["AdditiveLUTOperands", "additive_lut_matmul", "lut_available"]
