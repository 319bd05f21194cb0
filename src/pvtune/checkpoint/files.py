"""Crash-safe file writes: every file pvtune writes appears whole or not at all.

A file is written under a temporary name in its own directory, flushed to disk, then renamed
over its final name (``os.replace`` is atomic on POSIX file systems) and the directory entry
is flushed too. A process killed at any point leaves either the old file or the new one,
plus at most a temporary file that the next save in that directory removes.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from pvtune.errors import OutputError

TMP_MARK = ".pvtune-tmp"  # every temporary name contains this
LOCK_FILE = ".pvtune-lock"  # held by the run writing a folder (see OutputLock)


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


def is_write_error(err: BaseException) -> bool:
    """Whether ``err`` is a failed write: an ``OSError``, or what the Rust writers of
    safetensors and tokenizers raise for one (an exception ending in ``(os error N)``)."""
    return isinstance(err, OSError) or "(os error " in str(err) \
        or type(err).__name__ == "SafetensorError"


def write_error(err: BaseException, target: Path, kept: str = "") -> OutputError:
    """One clear :class:`OutputError` for a failed write of ``target``: the cause as the
    system gives it, the free space and file-size limit when they explain it, and ``kept``
    (what survives)."""
    cause = getattr(err, "strerror", None) or " ".join(str(err).split()) or type(err).__name__
    folder = next((p for p in (target, *target.parents) if p.is_dir()), Path("."))
    hints = []
    free = shutil.disk_usage(folder).free
    if free < 64 * 2**20:
        hints.append(f"{free / 2**20:.0f} MiB free on its disk")
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            hints.append(f"the file-size limit (ulimit -f) is {limit / 2**20:.1f} MiB")
    except (ImportError, OSError, ValueError):
        pass
    detail = f" ({'; '.join(hints)})" if hints else ""
    return OutputError(f"cannot write {target}: {cause}{detail}" + (f"; {kept}" if kept else ""))


@contextlib.contextmanager
def writing(target: Path, kept: str = "") -> Iterator[None]:
    """Turn a failed write inside the block into :func:`write_error`'s one-line error."""
    try:
        yield
    except OutputError:
        raise
    except Exception as err:  # noqa: BLE001 - only write errors are translated
        if not is_write_error(err):
            raise
        raise write_error(err, Path(target), kept) from None


class OutputLock:
    """Exclusive use of an output folder for one run: a second run (another process) that
    asks for the same folder gets an :class:`OutputError` naming the process that holds it.

    The lock is an advisory ``flock`` on ``LOCK_FILE`` inside the folder, so the system
    releases it when the holding process ends, however it ends (no stale locks). Where
    ``fcntl`` does not exist (Windows) the lock is a no-op.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock or raise :class:`OutputError` (without waiting)."""
        try:
            import fcntl
        except ImportError:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"{self.directory} is being written by another pvtune run "
                              f"({holder}); wait for it to finish or choose another output "
                              "folder") from None
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        command = " ".join(os.path.basename(a) if i == 0 else a
                           for i, a in enumerate(sys.argv))[:200]
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()}, started {stamp}: {command}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock back (also done when the object is collected or the process ends)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
