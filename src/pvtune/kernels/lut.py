"""Lookup-table matrix-vector products for additive (AQLM) codes with 8-bit codebooks.

For each token, a table of dot products between every input group and every codeword is
built once (``lut[t, j M + m, k] = x[t, j g : (j+1) g] . codebook[m, k]``); each output is
then ``scale[o] * sum_j sum_m lut[t, j M + m, codes[o, j, m]]``: ``in/g * M`` gathers and
adds per output instead of ``in`` multiply-adds, and the weight is never decoded.

The codes are kept slot-major (``[in/g * M, out]``, see :class:`AdditiveLUTOperands`): for
one slot, the 256-entry table (1 KiB) sits in L1 while a chunk of outputs gathers from it
with contiguous codes into an accumulator that stays in L1. The table and the gathers run
in one compiled call: the table serially (it is small), the gathers in one parallel region
over contiguous output chunks, one per thread (each thread owns its outputs: no shared
accumulator, unlike the ``aqlm`` package's CPU kernel). Prefill-sized inputs are faster
decoded and multiplied densely, which :class:`~pvtune.nn.QuantizedLinear` chooses
automatically.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @numba.njit(fastmath=True, inline="always", cache=True)
    def _build_table(x, t, books_t, lut):  # pragma: no cover - compiled
        # lut[j M + m, k] = x[t, j g : (j+1) g] . codebook[m, k]; books_t [M, g, K]
        books, g, size = books_t.shape
        for j in range(x.shape[1] // g):
            for m in range(books):
                row = lut[j * books + m]
                x0 = x[t, j * g]
                for k in range(size):
                    row[k] = x0 * books_t[m, 0, k]
                for d in range(1, g):
                    xv = x[t, j * g + d]
                    for k in range(size):
                        row[k] += xv * books_t[m, d, k]

    @numba.njit(fastmath=True, inline="always", cache=True)
    def _gather_rows(lut, codes_t, scales, out, t, lo, hi):  # pragma: no cover - compiled
        # out[t, o] = scale[o] * sum_s lut[s, codes_t[s, o]] for o in [lo, hi)
        acc = np.zeros(hi - lo, np.float32)
        for s in range(codes_t.shape[0]):
            table = lut[s]
            codes = codes_t[s, lo:hi]
            for i in range(hi - lo):
                acc[i] += table[codes[i]]
        for i in range(hi - lo):
            out[t, lo + i] = acc[i] * scales[lo + i]

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def _lut_matvec(x, books_t, codes_t, scales, out, chunks):  # pragma: no cover - compiled
        # x [T, J*g] f32, books_t [M, g, K] f32, codes_t [J*M, O] u8, scales [O] f32,
        # out [T, O] f32. Per token: the table (serial: small), then one parallel region
        # over ``chunks`` contiguous output chunks (one per thread).
        lut = np.empty((codes_t.shape[0], books_t.shape[2]), np.float32)
        outs = codes_t.shape[1]
        chunk = (outs + chunks - 1) // chunks
        for t in range(x.shape[0]):
            _build_table(x, t, books_t, lut)
            for c in numba.prange(chunks):
                lo = c * chunk
                hi = min(outs, lo + chunk)
                if lo < hi:
                    _gather_rows(lut, codes_t, scales, out, t, lo, hi)


@dataclass(frozen=True)
class AdditiveLUTOperands:
    """An AQLM weight laid out for the kernel: ``codes_t [in/g * M, out]`` uint8 (slot-major),
    ``books_t [M, g, 256]`` and ``scales [out]``, float32 numpy arrays. Build it once per
    weight with :meth:`from_weight` and reuse it for every token."""

    codes_t: np.ndarray
    books_t: np.ndarray
    scales: np.ndarray

    @classmethod
    def from_weight(cls, codes: Tensor, codebooks: Tensor, scales: Tensor) -> AdditiveLUTOperands:
        """From AQLM tensors: ``codes [out, in/g, M]`` (uint8), ``codebooks [M, 256, 1, g]``,
        ``scales [out, 1, 1, 1]``."""
        if codes.dtype != torch.uint8 or codebooks.shape[1] != 256:
            raise ValueError("the lookup-table kernel takes 8-bit codebooks (uint8 codes, "
                             f"256 codewords), got {codes.dtype} codes and "
                             f"{codebooks.shape[1]} codewords")
        with torch.no_grad():
            codes_t = codes.detach().cpu().reshape(codes.shape[0], -1).T.contiguous().numpy()
            books_t = (codebooks.detach().cpu().to(torch.float32)[:, :, 0, :]
                       .permute(0, 2, 1).contiguous().numpy())
            flat_scales = scales.detach().cpu().to(torch.float32).reshape(-1).contiguous()
        return cls(codes_t, books_t, flat_scales.numpy().copy())

    @property
    def in_features(self) -> int:
        """Width of the input rows."""
        return self.codes_t.shape[0] // self.books_t.shape[0] * self.books_t.shape[1]

    @property
    def out_features(self) -> int:
        """Width of the outputs."""
        return self.codes_t.shape[1]

    def matmul(self, x: Tensor) -> Tensor:
        """``x @ W.T`` for ``x [..., in]`` (CPU); returns float32 ``[..., out]``."""
        if numba is None:
            raise RuntimeError("the lookup-table kernel needs numba (pip install numba)")
        width, outs = x.shape[-1], self.codes_t.shape[1]
        if width * self.books_t.shape[0] != self.codes_t.shape[0] * self.books_t.shape[1]:
            raise ValueError(f"input has {width} features, the weight takes "
                             f"{self.in_features}")
        xs = x.detach().reshape(-1, width)
        if xs.dtype != torch.float32 or not xs.is_contiguous():
            xs = xs.to(torch.float32).contiguous()
        out = torch.empty(xs.shape[0], outs)
        _lut_matvec(xs.numpy(), self.books_t, self.codes_t, self.scales, out.numpy(),
                    numba.get_num_threads())
        return out.view(*x.shape[:-1], outs)


def additive_lut_matmul(x: Tensor, codes: Tensor, codebooks: Tensor, scales: Tensor) -> Tensor:
    """``x @ W.T`` for ``W`` decoded from AQLM codes ``[out, in/g, M]`` (uint8),
    ``codebooks [M, 256, 1, g]`` and ``scales [out, 1, 1, 1]``, without decoding ``W``.

    ``x`` is ``[..., in]`` (CPU); returns ``[..., out]`` in float32. Lays the weight out on
    every call: for repeated calls keep an :class:`AdditiveLUTOperands`."""
    return AdditiveLUTOperands.from_weight(codes, codebooks, scales).matmul(x)
