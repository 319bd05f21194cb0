"""Output folders one run at a time, and failed writes as one clear error that keeps the work."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from pvtune.checkpoint.files import LOCK_FILE, OutputLock, is_write_error, write_error, writing
from pvtune.errors import OutputError

FILE_TOO_LARGE = "File too large (os error 27)"  # what the Rust writers raise at ulimit -f


def hold_lock(directory):
    """Another process holding ``directory``'s lock until it is killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from pvtune.checkpoint.files import OutputLock
        lock = OutputLock({str(directory)!r}).acquire()
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_is_refused_and_told_who_holds_the_folder(tmp_path):
    proc = hold_lock(tmp_path / "out")
    try:
        with pytest.raises(OutputError, match=rf"being written by another pvtune run "
                                              rf"\(process {proc.pid}, started "):
            OutputLock(tmp_path / "out").acquire()
    finally:
        proc.kill()
        proc.wait()
    # the system released the dead holder's lock: no stale lock
    with OutputLock(tmp_path / "out"):
        assert (tmp_path / "out" / LOCK_FILE).is_file()


def test_the_lock_is_released_when_the_run_ends(tmp_path):
    lock = OutputLock(tmp_path).acquire()
    lock.release()
    with OutputLock(tmp_path):
        pass
    OutputLock(tmp_path).acquire()  # collected at once: released
    OutputLock(tmp_path).acquire().release()


def test_write_errors_are_recognised_and_named():
    assert is_write_error(OSError(28, "No space left on device"))
    assert is_write_error(Exception(FILE_TOO_LARGE))
    assert not is_write_error(ValueError("a bug"))
    err = write_error(Exception(FILE_TOO_LARGE), tempfile_path(), "nothing was saved")
    assert str(err).startswith(f"cannot write {tempfile_path()}: {FILE_TOO_LARGE}")
    assert str(err).endswith("; nothing was saved")
    with pytest.raises(OutputError, match="No space left on device"), writing(tempfile_path()):
        raise OSError(28, "No space left on device")
    with pytest.raises(ValueError, match="a bug"), writing(tempfile_path()):
        raise ValueError("a bug")  # not a write error: stays what it is


def tempfile_path():
    return __import__("pathlib").Path(tempfile.gettempdir()) / "x"


def test_lock_file_holds_the_holder(tmp_path):
    with OutputLock(tmp_path):
        text = (tmp_path / LOCK_FILE).read_text()
        assert text.startswith("process ") and time.strftime("%Y") in text
