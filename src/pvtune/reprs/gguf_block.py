"""GGUF block types as trainable representations: codes and scales that *are* a llama.cpp
block format, so an export writes them byte for byte.

Each format quantizes blocks of ``block_size`` consecutive input weights of one row with one
fp16 scale ``d`` (and, for ``Q4_1``, one fp16 offset ``m``)::

    W = d * (step * q - zero) + m          q in [0, 2^bits - 1]

========  =====  ====  ====  ====  ===  ====================================  ============
format    block  bits  step  zero  m    values                                bits/weight
========  =====  ====  ====  ====  ===  ====================================  ============
``q8_0``  32     8     1     128   no   ``d * q_signed`` (int8)               8.5
``q4_0``  32     4     1     8     no   ``d * (q - 8)``                       4.5
``q4_1``  32     4     1     0     yes  ``d * q + m``                         5.0
``q2_0``  64     2     1     1     no   ``d * (q - 1)``: {-d, 0, d, 2d}       2.25
``q1_0``  128    1     2     1     no   ``q ? d : -d``                        1.125
``tq2_0`` 256    2     1     1     no   ``d * (q - 1)``, q <= 2: {-d, 0, d}   2.0625
========  =====  ====  ====  ====  ===  ====================================  ============

The block layouts (what :func:`pack_blocks` writes) follow ggml's ``ggml-common.h``:
``Q4_x`` put weight ``j`` in the low nibble of byte ``j`` and weight ``j + 16`` in its high
nibble; ``Q8_0`` stores signed bytes; ``Q2_0`` puts weight ``j`` at bits ``2 (j % 4)`` of byte
``j / 4``; ``Q1_0`` puts weight ``j`` at bit ``j % 8`` of byte ``j / 8`` (1 means ``+d``).
``TQ2_0`` (ternary, BitNet-style) stores its ``d`` *after* the codes and interleaves them:
weight ``128 c + 32 l + i`` sits at bits ``2 l`` of byte ``32 c + i``; it needs rows whose
width is a multiple of 256. ``d`` may be negative, as llama.cpp's own ``Q4_0`` quantizer
makes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.packing import BitCodec, IntCodec
from pvtune.reprs.base import (
    ReprConfig,
    register_representation,
    round_to_fp16,
)
from pvtune.reprs.scalar_grid import ScalarGridWeight
from pvtune.reprs.uniform import FP16_TINY


@dataclass(frozen=True)
class BlockFormat:
    """One GGUF block type: ``W = d * (step * q - zero) + m`` per block of weights."""

    name: str
    ggml_type: int  # ggml's GGML_TYPE_* number (Q2_0 is newer than the gguf package's enum)
    file_type: int  # llama.cpp's LLAMA_FTYPE_MOSTLY_* for a file mostly of this type
    block_size: int
    bits: int
    step: int
    zero: int
    has_min: bool
    max_code: int | None = None  # largest code when below 2^bits - 1 (TQ2_0: ternary)
    interleaved: bool = False  # TQ2_0's layout: 4 runs of 32 weights per 32 bytes, d last

    @property
    def maxq(self) -> int:
        """Largest integer code."""
        return (1 << self.bits) - 1 if self.max_code is None else self.max_code

    @property
    def type_size(self) -> int:
        """Bytes per block: fp16 ``d`` (and ``m``) plus the packed codes."""
        return 2 * (2 if self.has_min else 1) + self.block_size * self.bits // 8

    @property
    def bits_per_weight(self) -> float:
        """Exact storage cost of one weight in this format."""
        return 8 * self.type_size / self.block_size

    @property
    def levels(self) -> Tensor:
        """The multipliers of ``d`` for each code (``m`` aside)."""
        return torch.arange(self.maxq + 1, dtype=torch.float32) * self.step - self.zero


BLOCK_FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        BlockFormat("q8_0", 8, 7, 32, 8, 1, 128, False),
        BlockFormat("q4_0", 2, 2, 32, 4, 1, 8, False),
        BlockFormat("q4_1", 3, 3, 32, 4, 1, 0, True),
        BlockFormat("q2_0", 42, 41, 64, 2, 1, 1, False),
        BlockFormat("q1_0", 41, 40, 128, 1, 2, 1, False),
        BlockFormat("tq2_0", 35, 37, 256, 2, 1, 1, False, max_code=2, interleaved=True),
    )
}


def block_format(name: str) -> BlockFormat:
    """The :class:`BlockFormat` called ``name`` (case-insensitive); a :class:`ConfigError`
    lists the known ones."""
    fmt = BLOCK_FORMATS.get(str(name).lower())
    if fmt is None:
        raise ConfigError(f"unknown GGUF block type {name!r}; known: {sorted(BLOCK_FORMATS)}")
    return fmt


@dataclass(frozen=True)
class GGUFBlockConfig(ReprConfig):
    """A GGUF block type (``q8_0``, ``q4_0``, ``q4_1``, ``q2_0``, ``q1_0`` or ``tq2_0``); the
    row width must be a multiple of its block size (32, 64, 128 or 256)."""

    block_type: str = "q4_0"

    def __post_init__(self) -> None:
        if not isinstance(self.block_type, str):
            raise ConfigError(f"GGUFBlockConfig.block_type must be a string, got "
                              f"{self.block_type!r}")
        object.__setattr__(self, "block_type", block_format(self.block_type).name)

    @property
    def format(self) -> BlockFormat:
        """This config's :class:`BlockFormat`."""
        return BLOCK_FORMATS[self.block_type]

    def check_shape(self, out_features: int, in_features: int) -> None:
        bs = self.format.block_size
        if in_features % bs:
            raise ConfigError(
                f"GGUF {self.block_type} needs rows whose width is a multiple of {bs}; "
                f"in_features={in_features} is not. Keep this layer in another type (e.g. "
                f"q8_0 or q4_0, blocks of 32)"
            )


def fit_block_grid(w: Tensor, fmt: BlockFormat, ratios: int = 16) -> tuple[Tensor, Tensor]:
    """Per block (last dim of ``w``), the fp16 scale ``d`` and offset ``m`` with the least
    squared error over a small search: both signs of ``d`` and ``ratios`` shrink factors of
    the range (``m`` is 0 without an offset). Returns tensors shaped ``w.shape[:-1]``."""
    w = w.to(torch.float32)
    levels = fmt.levels.to(w.device)
    best_err = torch.full(w.shape[:-1], float("inf"), device=w.device)
    best_d = torch.ones(w.shape[:-1], device=w.device)
    best_m = torch.zeros(w.shape[:-1], device=w.device)
    if fmt.has_min:
        lo, hi = w.amin(-1), w.amax(-1)
        candidates = []
        for r in torch.linspace(0.5, 1.0, ratios).tolist():
            span = (hi - lo) * r
            candidates.append((span / fmt.maxq, lo + (hi - lo - span) / 2))
    else:
        amax = w.abs().amax(-1)
        base = amax / levels.abs().max()
        candidates = [(s * base * r, torch.zeros_like(base))
                      for s in (1.0, -1.0) for r in torch.linspace(0.3, 1.0, ratios).tolist()]
        candidates.append((w.abs().mean(-1), torch.zeros_like(base)))  # L2-optimal for signs
    for d, m in candidates:
        d = round_to_fp16(_nonzero(d))
        m = round_to_fp16(m)
        q = round_to_codes(w, d.unsqueeze(-1), m.unsqueeze(-1), fmt)
        err = (decode_codes(q, d.unsqueeze(-1), m.unsqueeze(-1), fmt) - w).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_d = torch.where(better, d, best_d)
        best_m = torch.where(better, m, best_m)
    return best_d, best_m


def _nonzero(d: Tensor) -> Tensor:
    """``d`` with magnitudes below the smallest normal fp16 raised to it (sign kept)."""
    sign = torch.where(d < 0, -1.0, 1.0).to(d.dtype)
    return sign * d.abs().clamp(min=FP16_TINY)


def round_to_codes(w: Tensor, d: Tensor, m: Tensor, fmt: BlockFormat) -> Tensor:
    """Nearest code of each weight (float tensor), broadcasting ``d`` and ``m``."""
    x = ((w - m) / _nonzero(d) + fmt.zero) / fmt.step
    return torch.clamp(torch.round(x), 0, fmt.maxq)


def decode_codes(q: Tensor, d: Tensor, m: Tensor, fmt: BlockFormat) -> Tensor:
    """``d * (step * q - zero) + m`` (broadcasting)."""
    return d * (q * fmt.step - fmt.zero) + m


@register_representation("gguf_block")
class GGUFBlockWeight(ScalarGridWeight):
    """A GGUF block type: codes ``[out, in]`` (uint8), scale ``d`` ``[out, in/block]`` and,
    for ``Q4_1``, offset ``m`` ``[out, in/block]`` (parameters, fp16 values)."""

    config_cls = GGUFBlockConfig
    step_unit_kind = "grid"

    def __init__(self, out_features: int, in_features: int, config: GGUFBlockConfig) -> None:
        super().__init__(out_features, in_features, config)
        self.format = config.format
        self.group = self.format.block_size
        nblocks = in_features // self.group
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.scale = nn.Parameter(torch.ones(out_features, nblocks))
        if self.format.has_min:
            self.offset = nn.Parameter(torch.zeros(out_features, nblocks))
        else:
            self.register_buffer("offset", torch.zeros(out_features, nblocks), persistent=False)

    # -- the grid (shared with GPTQ) -----------------------------------------------------
    def fit_grid(self, w_grouped: Tensor) -> tuple[Tensor, Tensor]:
        """``(d, m)`` fitted to weights grouped ``[out, blocks, block]``."""
        return fit_block_grid(w_grouped, self.format)

    def set_grid(self, d: Tensor, m: Tensor) -> None:
        """Set every block's scale and offset (offset ignored by formats without one)."""
        with torch.no_grad():
            self.scale.copy_(d.reshape(self.scale.shape))
            if self.format.has_min:
                self.offset.copy_(m.reshape(self.offset.shape))

    def round_column(self, w: Tensor, grid: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Nearest codes of one column of weights given its blocks' ``(d, m)``, and their
        decoded values."""
        d, m = grid
        q = round_to_codes(w, d, m, self.format)
        return q, decode_codes(q, d, m, self.format)

    def init_from_dense(self, weight: Tensor) -> None:
        self.set_grid(*self.fit_grid(self.grouped(weight)))
        self.encode(weight)

    # -- the representation --------------------------------------------------------------
    def forward(self) -> Tensor:
        q = self.grouped(self.codes).to(self.scale.dtype)
        w = decode_codes(q, self.scale.unsqueeze(-1), self.offset.unsqueeze(-1), self.format)
        return w.reshape(self.out_features, self.in_features)

    def decode_groups(self, index: Tensor) -> Tensor:
        with torch.no_grad():
            block = self.group_index(index)
            q = self.codes.view(-1)[index].to(self.scale.dtype)
            d = self.scale.detach().reshape(-1)[block]
            m = self.offset.detach().reshape(-1)[block]
            return decode_codes(q, d, m, self.format).unsqueeze(-1)

    def grid_params(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self.scale.detach(), self.offset.detach()

    @property
    def max_code(self) -> int:
        return self.format.maxq

    def nearest_codes(self, x: Tensor, d: Tensor, m: Tensor) -> Tensor:
        return round_to_codes(x, d, m, self.format)

    def code_position(self, x: Tensor, d: Tensor, m: Tensor) -> Tensor:
        return ((x - m) / _nonzero(d) + self.format.zero) / self.format.step

    def step_unit(self) -> Tensor:
        """The grid step ``|d| * step`` of each block."""
        with torch.no_grad():
            return self.scale.abs() * self.format.step

    def bits_per_param(self) -> float:
        return self.format.bits_per_weight

    def integer_codecs(self) -> dict[str, IntCodec]:
        return {"codes": BitCodec(self.format.bits)}

    # -- GGUF bytes ----------------------------------------------------------------------
    def to_gguf_blocks(self) -> np.ndarray:
        """This weight in its GGUF block layout: ``uint8 [out, in / block * type_size]``."""
        with torch.no_grad():
            return pack_blocks(self.codes, self.scale.detach(), self.offset.detach(),
                               self.format)

    @classmethod
    def from_gguf_blocks(cls, data: np.ndarray, out_features: int, in_features: int,
                         config: GGUFBlockConfig) -> GGUFBlockWeight:
        """Inverse of :meth:`to_gguf_blocks` (bit-exact)."""
        rep = cls(out_features, in_features, config)
        codes, d, m = unpack_blocks(data, out_features, in_features, config.format)
        with torch.no_grad():
            rep.codes.copy_(codes)
            rep.set_grid(d, m)
        return rep


def _fp16_bytes(x: Tensor) -> np.ndarray:
    """``[..., n]`` float values -> ``[..., 2n]`` uint8 (little-endian fp16)."""
    return x.to(torch.float16).numpy().astype("<f2").view(np.uint8)


def pack_blocks(codes: Tensor, d: Tensor, m: Tensor, fmt: BlockFormat) -> np.ndarray:
    """Codes ``[out, in]`` and per-block ``d``, ``m`` ``[out, in / block]`` -> GGUF blocks
    ``uint8 [out, (in / block) * type_size]``."""
    out, inp = codes.shape
    nb, bs = inp // fmt.block_size, fmt.block_size
    q = codes.to(torch.int64).reshape(out, nb, bs).numpy()
    if fmt.interleaved:  # TQ2_0: byte 32 c + i holds weights 128 c + 32 l + i at bits 2 l
        runs = q.reshape(out, nb, bs // 128, 4, 32) << (2 * np.arange(4)).reshape(4, 1)
        qs = runs.sum(-2).reshape(out, nb, bs // 4).astype(np.uint8)
        return np.concatenate([qs, _fp16_bytes(d.reshape(out, nb, 1))],
                              axis=-1).reshape(out, nb * fmt.type_size)
    parts = [_fp16_bytes(d.reshape(out, nb, 1))]
    if fmt.has_min:
        parts.append(_fp16_bytes(m.reshape(out, nb, 1)))
    if fmt.bits == 8:
        qs = (q - fmt.zero).astype(np.int8).view(np.uint8)
    elif fmt.bits == 4:
        qs = (q[..., : bs // 2] | (q[..., bs // 2 :] << 4)).astype(np.uint8)
    else:  # 2 and 1 bits: little-endian within each byte
        per = 8 // fmt.bits
        shifts = np.arange(per) * fmt.bits
        qs = (q.reshape(out, nb, bs // per, per) << shifts).sum(-1).astype(np.uint8)
    parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(out, nb * fmt.type_size)


def unpack_blocks(data: np.ndarray, out: int, inp: int,
                  fmt: BlockFormat) -> tuple[Tensor, Tensor, Tensor]:
    """GGUF blocks -> ``(codes uint8 [out, in], d [out, in/block], m [out, in/block])``."""
    nb, bs = inp // fmt.block_size, fmt.block_size
    expected = out * nb * fmt.type_size
    data = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    if data.size != expected:
        raise ValueError(f"{fmt.name} tensor of shape {(out, inp)} needs {expected} bytes, "
                         f"got {data.size}")
    blocks = data.reshape(out, nb, fmt.type_size)
    if fmt.interleaved:
        d = torch.from_numpy(blocks[..., -2:].copy().view("<f2").astype(np.float32)[..., 0])
        qs = blocks[..., :-2].astype(np.int64).reshape(out, nb, bs // 128, 1, 32)
        q = ((qs >> (2 * np.arange(4)).reshape(4, 1)) & 3).reshape(out, inp)
        return torch.from_numpy(q.astype(np.uint8)), d, torch.zeros(out, nb)
    d = torch.from_numpy(blocks[..., :2].copy().view("<f2").astype(np.float32)[..., 0])
    start = 2
    m = torch.zeros(out, nb)
    if fmt.has_min:
        m = torch.from_numpy(blocks[..., 2:4].copy().view("<f2").astype(np.float32)[..., 0])
        start = 4
    qs = blocks[..., start:].astype(np.int64)
    if fmt.bits == 8:
        q = qs.astype(np.uint8).view(np.int8).astype(np.int64) + fmt.zero
    elif fmt.bits == 4:
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    else:
        per = 8 // fmt.bits
        shifts = np.arange(per) * fmt.bits
        q = ((qs[..., None] >> shifts) & fmt.maxq).reshape(out, nb, bs)
    codes = torch.from_numpy(q.reshape(out, inp).astype(np.uint8))
    return codes, d, m
