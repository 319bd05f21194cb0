"""A save killed with SIGKILL at any point leaves the old checkpoint, the new one, or a
directory that loading reports as incomplete: never a silently mixed state."""

from __future__ import annotations

import shutil

import pytest
import torch

from pvtune import CheckpointError, load_quantized, save_quantized
from pvtune.checkpoint.files import TMP_MARK
from tests.checkpoint.crash import run_killed
from tests.checkpoint.test_format import build, quantized

IDS = torch.arange(10)


def outputs_after_load(directory):
    fresh = build(seed=7)
    load_quantized(fresh, directory)
    with torch.no_grad():
        return fresh(IDS)


@pytest.mark.parametrize("when", ["before", "after", "mid-write"])
def test_killed_resave_leaves_old_or_new(tmp_path, when):
    old, new = quantized(seed=0), quantized(seed=1)
    with torch.no_grad():
        want_old, want_new = old(IDS), new(IDS)
    base = tmp_path / "base"
    save_quantized(old, base)
    seen = set()
    for point in range(1, 10):
        work = tmp_path / f"{when}-{point}"
        shutil.copytree(base, work)
        killed = run_killed(lambda work=work: save_quantized(new, work), point, when)
        got = outputs_after_load(work)
        state = "old" if torch.equal(got, want_old) else "new" if torch.equal(got, want_new) \
            else "mixed"
        assert state != "mixed", (when, point)
        seen.add(state)
        save_quantized(new, work)  # the next save works and clears the leftovers
        assert not [p for p in work.iterdir() if TMP_MARK in p.name]
        if not killed:
            break
    assert seen == {"old", "new"}


@pytest.mark.parametrize("when", ["before", "after", "mid-write"])
def test_killed_first_save_is_new_or_reported(tmp_path, when):
    model = quantized(seed=2)
    with torch.no_grad():
        want = model(IDS)
    for point in range(1, 10):
        work = tmp_path / f"{when}-{point}"
        killed = run_killed(lambda work=work: save_quantized(model, work), point, when)
        try:
            got = outputs_after_load(work)
        except CheckpointError as err:  # killed before the commit: said plainly
            assert killed and ("incomplete" in str(err) or "not a pvtune" in str(err))
        else:
            assert torch.equal(got, want)  # the commit happened: the whole new model
        if not killed:
            break
