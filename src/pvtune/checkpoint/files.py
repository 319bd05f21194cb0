"""Crash-safe file writes: every file pvtune writes appears whole or not at all.

A file is written under a temporary name in its own directory, flushed to disk, then renamed
over its final name (``os.replace`` is atomic on POSIX file systems) and the directory entry
is flushed too. A process killed at any point leaves either the old file or the new one,
plus at most a temporary file that the next save in that directory removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

TMP_MARK = ".pvtune-tmp"  # every temporary name contains this


def temporary_path(path: Path) -> Path:
    """A unique temporary name beside ``path`` (same directory, so a rename is atomic)."""
    return path.with_name(f".{path.name}{TMP_MARK}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: Path, target: Path) -> None:
    """Flush ``source`` to disk, rename it over ``target`` and flush the directory entry."""
    if source.is_file():
        _fsync_file(source)
    os.replace(source, target)
    _fsync_dir(target.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all."""
    tmp = temporary_path(path)
    try:
        tmp.write_bytes(data)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` whole or not at all."""
    write_bytes_atomic(path, (json.dumps(obj, indent=indent, default=str) + "\n").encode())


def save_tensors_atomic(tensors: dict[str, Tensor], path: Path,
                        metadata: dict[str, str] | None = None) -> str:
    """``safetensors`` file at ``path`` written whole or not at all; returns its SHA-256."""
    tmp = temporary_path(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
        replace_durably(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest


def save_tensors_by_content(tensors: dict[str, Tensor], directory: Path, prefix: str,
                            metadata: dict[str, str] | None = None) -> tuple[str, str]:
    """``safetensors`` file ``PREFIX-<sha256[:16]>.safetensors`` in ``directory``, written whole
    or not at all; returns ``(file name, sha256)``. A new content never overwrites an old
    file, so a reader that still names the old file keeps finding it."""
    tmp = temporary_path(directory / f"{prefix}.safetensors")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
        name = f"{prefix}-{digest[:16]}.safetensors"
        replace_durably(tmp, directory / name)
    finally:
        tmp.unlink(missing_ok=True)
    return name, digest


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_temporaries(directory: Path) -> None:
    """Delete what killed saves left in ``directory`` (names containing :data:`TMP_MARK`)."""
    if not directory.is_dir():
        return
    for leftover in directory.iterdir():
        if TMP_MARK in leftover.name:
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
