"""Lookup-table matrix-vector products for additive (AQLM) codes with 8-bit codebooks.

For each token, a table of dot products between every input group and every codeword is
built once (``lut[j, m, k] = x[j g : (j+1) g] . codebook[m, k]``, one small matmul); each
output is then ``scale[o] * sum_j sum_m lut[j, m, codes[o, j, m]]``: ``in/g * M`` gathers
and adds per output instead of ``in`` multiply-adds, and the weight is never decoded.

The kernel parallelises over output rows (each thread owns its outputs: no shared
accumulator) and handles a few tokens per call; prefill-sized inputs are faster decoded and
multiplied densely, which :class:`~pvtune.nn.QuantizedLinear` chooses automatically.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:
    import numba
except ImportError:  # the kernel is optional: dequantize-then-matmul always works
    numba = None


def lut_available() -> bool:
    """Whether the compiled kernel can run (numba importable)."""
    return numba is not None


if numba is not None:

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _lut_gemv(lut, codes, scales, out):  # pragma: no cover - compiled
        # lut [T, J*M*K] float32 (table jm at offset jm*K), codes [O, J*M] uint8,
        # scales [O] float32, out [T, O]
        tokens, slots = lut.shape[0], codes.shape[1]
        size = lut.shape[1] // slots
        for o in numba.prange(codes.shape[0]):
            row = codes[o]
            for t in range(tokens):
                table = lut[t]
                acc = np.float32(0.0)
                for jm in range(slots):
                    acc += table[jm * size + row[jm]]
                out[t, o] = acc * scales[o]


def additive_lut_matmul(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """``x @ W.T`` for ``W`` decoded from AQLM codes ``[out, in/g, M]`` (uint8),
    ``codebooks [M, 256, 1, g]`` and ``scales [out, 1, 1, 1]``, without decoding ``W``.

    ``x`` is ``[..., in]`` (float32, CPU); returns ``[..., out]`` in float32."""
    if numba is None:
        raise RuntimeError("the lookup-table kernel needs numba (pip install numba)")
    books, size, _, g = codebooks.shape
    lead = x.shape[:-1]
    xs = x.reshape(-1, x.shape[-1]).to(torch.float32)
    groups = xs.shape[1] // g
    with torch.no_grad():
        table = codebooks.detach().to(torch.float32).reshape(books * size, g)
        lut = (xs.reshape(-1, g) @ table.T).reshape(xs.shape[0], groups, books, size)
        out = np.empty((xs.shape[0], codes.shape[0]), dtype=np.float32)
        _lut_gemv(lut.reshape(xs.shape[0], -1).numpy(),
                  codes.reshape(codes.shape[0], -1).contiguous().numpy(),
                  scales.detach().to(torch.float32).reshape(-1).contiguous().numpy(), out)
    return torch.from_numpy(out).reshape(*lead, codes.shape[0])
