"""Reading a GGUF file's metadata and tensor directory (format version 2 and 3).

The ``gguf`` package's reader refuses tensor types newer than its release (``Q2_0``), so
pvtune reads the directory itself: the header, the key/value metadata, then one record per
tensor (name, shape, ggml type, offset), with the data memory-mapped, never copied.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pvtune.errors import DataError
from pvtune.reprs.gguf_block import BLOCK_FORMATS

# ggml type -> (block size, bytes per block) for the types pvtune reads or writes
_PLAIN_TYPES = {0: (1, 4), 1: (1, 2), 30: (1, 2)}  # F32, F16, BF16
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def type_sizes(ggml_type: int) -> tuple[int, int]:
    """``(block size, bytes per block)`` of a ggml tensor type."""
    if ggml_type in _PLAIN_TYPES:
        return _PLAIN_TYPES[ggml_type]
    for fmt in BLOCK_FORMATS.values():
        if fmt.ggml_type == ggml_type:
            return fmt.block_size, fmt.type_size
    import gguf

    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise DataError(f"unknown ggml tensor type {ggml_type}") from None


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: ``shape`` in row-major (numpy) order, ``data`` its raw bytes."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, memory-mapped


@dataclass(frozen=True)
class GGUFContents:
    """A GGUF file's metadata (key -> value) and tensors (name -> :class:`GGUFTensor`)."""

    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    def __init__(self, buf: np.ndarray, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise DataError(f"{self.path} is truncated (directory runs past the end of the file)")
        out = self.buf[self.pos:self.pos + n].tobytes()
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            return [self.value(itype) for _ in range(count)]
        raise DataError(f"{self.path}: unknown GGUF value type {vtype}")


def read_gguf(path: str | Path) -> GGUFContents:
    """Parse ``path``'s metadata and tensor directory; tensor data stays memory-mapped."""
    path = Path(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(buf, path)
    if cur.take(4) != b"GGUF":
        raise DataError(f"{path} is not a GGUF file (no GGUF magic number)")
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise DataError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        infos.append((name, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")))
    align = int(metadata.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        block, size = type_sizes(ggml_type)
        count = int(np.prod(shape)) if shape else 1
        nbytes = count // block * size
        begin = start + offset
        if begin + nbytes > len(buf):
            raise DataError(f"{path} is truncated: tensor {name!r} runs past the end of the file")
        tensors[name] = GGUFTensor(name, ggml_type, shape, buf[begin:begin + nbytes])
    return GGUFContents(metadata, tensors)
