"""Output folders of the long verbs (compress, fine-tune): refused before any work when
writing there would lose or mix work, locked while a run writes them, checked for room.

    lock = prepare_output(Path("out"), overwrite=False, forbidden={"source model": src})
    check_space(Path("out"), needed_bytes=2 * params)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pvtune.checkpoint.files import LOCK_FILE, OutputLock
from pvtune.errors import OutputError

# what pvtune itself keeps inside an output (a fine-tune's resume state and teacher cache)
OWNED_SUBFOLDERS = ("resume", "teacher_cache")


def same_path(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder."""
    return a.expanduser().resolve() == b.expanduser().resolve()


def prepare_output(output: Path, overwrite: bool,
                   forbidden: dict[str, Path | None]) -> OutputLock:
    """Refuse an output that would lose or mix work, before any work is done: a folder
    another run is writing, a file, one of the ``forbidden`` folders (named by what they
    are), a non-empty folder unless ``overwrite`` (pvtune's own resume state and teacher
    cache excepted), a folder that cannot be written. Returns the folder's lock: keep it
    until the work is saved."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"the output {output} is a file; give a folder for the checkpoint")
    for what, path in forbidden.items():
        if path is not None and path.exists() and same_path(output, path):
            raise OutputError(f"the output {output} is the {what}: writing there would "
                              "replace it; choose another output folder")
    # an existing folder is locked first: a run writing it is named, not called "not empty"
    lock = OutputLock(output).acquire() if output.is_dir() and os.access(output, os.W_OK) \
        else None
    if output.is_dir() and not overwrite:
        other = [p.name for p in output.iterdir()
                 if p.name not in OWNED_SUBFOLDERS and p.name != LOCK_FILE]
        if other:
            raise OutputError(f"output folder {output} is not empty ({', '.join(other[:3])}"
                              f"{', ...' if len(other) > 3 else ''}); allow overwriting it or "
                              "choose another output folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".pvtune-write-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
        return lock or OutputLock(output).acquire()
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(f"cannot write to the output {output}: {err.strerror or err}") \
            from None


def check_space(output: Path, needed_bytes: int) -> None:
    """Refuse an output folder without room for the checkpoint (found before the work)."""
    free = shutil.disk_usage(output).free
    if free < needed_bytes:
        raise OutputError(f"the output {output} has {free / 2**20:.0f} MiB free, but the "
                          f"checkpoint needs about {needed_bytes / 2**20:.0f} MiB; free some "
                          "space or choose another output folder")
