"""Kill -9 a save at a chosen point: a forked child runs the save and SIGKILLs itself before or
after its k-th file rename, or half way through writing a tensor file."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import torch

import pvtune.checkpoint.files as files


def run_killed(save: Callable[[], None], point: int, when: str) -> bool:
    """Run ``save`` in a forked child killed before or after its rename number ``point``
    (``when`` is ``"before"`` or ``"after"``), or half way through writing its tensor file
    number ``point`` (``"mid-write"``); True if it was killed, False if the save finished
    first."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            # the parent's intra-op thread pool does not survive fork(): stay on this thread
            torch.set_num_threads(1)
            calls, writes = [0], [0]
            real_replace, real_save = os.replace, files.save_file

            def die() -> None:
                os.kill(os.getpid(), signal.SIGKILL)

            def replace(src, dst):
                calls[0] += 1
                if calls[0] == point and when == "before":
                    die()
                real_replace(src, dst)
                if calls[0] == point and when == "after":
                    die()

            def save_file(tensors, path, metadata=None):
                real_save(tensors, path, metadata=metadata)
                writes[0] += 1
                if writes[0] == point and when == "mid-write":
                    size = os.path.getsize(path)
                    os.truncate(path, size // 2)
                    die()

            os.replace = replace
            files.save_file = save_file
            save()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
