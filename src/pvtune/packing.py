"""Packing integer codes into dense byte streams for checkpoints.

A codec turns an integer tensor into a 1-D ``uint8`` tensor and back, bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor


class IntCodec(Protocol):
    """Packs integer codes to bytes and back."""

    def pack(self, codes: Tensor) -> Tensor:
        """Codes (any shape, values in range) -> 1-D uint8 tensor."""
        ...

    def unpack(self, packed: Tensor, numel: int) -> Tensor:
        """Inverse of :meth:`pack`: 1-D int64 tensor of ``numel`` codes."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON description (``codec_from_dict`` rebuilds it)."""
        ...


@dataclass(frozen=True)
class BitCodec:
    """``bits`` bits per code, little-endian bit order, one stream for the whole tensor."""

    bits: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 32:
            raise ValueError(f"BitCodec.bits must be in [1, 32], got {self.bits}")

    _CHUNK = 1 << 20  # codes per chunk; a multiple of 8 keeps chunks byte-aligned

    def pack(self, codes: Tensor) -> Tensor:
        flat = codes.detach().reshape(-1).to(torch.int64).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= (1 << self.bits)):
            raise ValueError(
                f"codes out of range for {self.bits}-bit packing: "
                f"[{flat.min()}, {flat.max()}]"
            )
        shifts = np.arange(self.bits, dtype=np.int64)
        chunks = []
        for start in range(0, flat.size, self._CHUNK):
            part = flat[start : start + self._CHUNK]
            bitplanes = ((part[:, None] >> shifts) & 1).astype(np.uint8)
            chunks.append(np.packbits(bitplanes.reshape(-1), bitorder="little"))
        packed = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
        return torch.from_numpy(packed)

    def unpack(self, packed: Tensor, numel: int) -> Tensor:
        data = packed.cpu().numpy()
        expected = (numel * self.bits + 7) // 8
        if data.size != expected:
            raise ValueError(
                f"packed code stream has {data.size} bytes, expected {expected} "
                f"({numel} codes x {self.bits} bits): the checkpoint is truncated or corrupted"
            )
        weights = 1 << np.arange(self.bits, dtype=np.int64)
        out = np.empty(numel, dtype=np.int64)
        step_bytes = self._CHUNK * self.bits // 8
        for i, start in enumerate(range(0, numel, self._CHUNK)):
            count = min(self._CHUNK, numel - start)
            part = data[i * step_bytes : i * step_bytes + (count * self.bits + 7) // 8]
            bits = np.unpackbits(part, count=count * self.bits, bitorder="little")
            out[start : start + count] = bits.reshape(count, self.bits).astype(np.int64) @ weights
        return torch.from_numpy(out)

    def to_dict(self) -> dict[str, Any]:
        return {"codec": "bits", "bits": self.bits}


@dataclass(frozen=True)
class TritCodec:
    """Ternary codes {0, 1, 2}, five per byte (3^5 = 243 <= 256): 1.6 bits per code."""

    def pack(self, codes: Tensor) -> Tensor:
        flat = codes.detach().reshape(-1).to(torch.int64).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() > 2):
            raise ValueError(
                f"ternary codes must be in {{0, 1, 2}}, got [{flat.min()}, {flat.max()}]"
            )
        pad = (-flat.size) % 5
        flat = np.concatenate([flat, np.zeros(pad, dtype=np.int64)]).reshape(-1, 5)
        return torch.from_numpy((flat @ (3 ** np.arange(5, dtype=np.int64))).astype(np.uint8))

    def unpack(self, packed: Tensor, numel: int) -> Tensor:
        if packed.numel() != (numel + 4) // 5:
            raise ValueError(
                f"packed trit stream has {packed.numel()} bytes, expected {(numel + 4) // 5}: "
                "the checkpoint is truncated or corrupted"
            )
        values = packed.cpu().numpy().astype(np.int64)[:, None]
        trits = (values // (3 ** np.arange(5, dtype=np.int64))) % 3
        return torch.from_numpy(trits.reshape(-1)[:numel].copy())

    def to_dict(self) -> dict[str, Any]:
        return {"codec": "trits"}


_CODECS = {"bits": lambda d: BitCodec(int(d["bits"])), "trits": lambda d: TritCodec()}


def codec_from_dict(data: dict[str, Any]) -> IntCodec:
    """Rebuild a codec from :meth:`IntCodec.to_dict` output."""
    try:
        return _CODECS[data["codec"]](data)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"unknown or malformed integer codec {data!r}") from None
