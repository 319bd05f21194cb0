"""Compiled CPU kernels (numba): running compressed weights without decoding them, and the
nearest-codeword search that encoding into codebooks repeats."""

from pvtune.kernels.lut import AdditiveLUTOperands, additive_lut_matmul, lut_available
from pvtune.kernels.nearest import nearest_codewords, nearest_kernel_available

__all__ = ["AdditiveLUTOperands", "additive_lut_matmul", "lut_available", "nearest_codewords",
           "nearest_kernel_available"]
