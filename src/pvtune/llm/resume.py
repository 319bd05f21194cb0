"""The resume state of a fine-tune: everything its trajectory depends on, written crash-safe
every ``checkpoint_every`` steps, and refused when a restarted run differs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from pvtune.checkpoint.files import (
    remove_temporaries,
    save_tensors_by_content,
    sha256_file,
    write_json_atomic,
)
from pvtune.distributed import placed_like
from pvtune.errors import CheckpointError, ConfigError
from pvtune.optim.state_io import optimizer_from_tensors

if TYPE_CHECKING:
    from pvtune.llm.finetune import FinetuneConfig
    from pvtune.optim.pv import PVOptimizer

RESUME_PREFIX = "resume_state"  # tensors: resume_state-<sha256 prefix>.safetensors
RESUME_META = "resume_state.json"  # the commit record naming them


# settings that do not change the training trajectory: a resumed run may change them
RESUME_FREE = ("eval_every", "checkpoint_every", "vstep_placement", "shard", "time_budget")


def trajectory_settings(config: FinetuneConfig) -> dict[str, Any]:
    """The config as JSON values, without the fields a resumed run may change."""
    settings = json.loads(json.dumps(asdict(config)))
    return {k: v for k, v in settings.items() if k not in RESUME_FREE}


def save_resume_state(directory: Path, tensors: dict[str, Tensor], layout: dict[str, Any],
                 adam_meta: dict[str, Any], result, step: int, config: FinetuneConfig,
                 run: dict[str, Any]) -> None:
    """Crash-safe: the tensors go to a new content-named file; the JSON record naming it
    (with its checksum and step) is written last, atomically; older files go after it."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_temporaries(directory)
    name, digest = save_tensors_by_content(tensors, directory, RESUME_PREFIX)
    meta = {"step": step, "file": name, "sha256": digest, "layout": layout, "adam": adam_meta,
            "result": asdict(result), "settings": trajectory_settings(config), "run": run}
    write_json_atomic(directory / RESUME_META, meta, indent=None)
    for old in directory.glob(f"{RESUME_PREFIX}-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def clear_resume_state(directory: Path) -> None:
    """Remove a finished run's resume state (call after its final checkpoint is saved): a
    rerun of the same command then finds a finished output, not a run to continue."""
    (directory / RESUME_META).unlink(missing_ok=True)  # first: the tensors alone mean nothing
    for path in directory.glob(f"{RESUME_PREFIX}-*.safetensors"):
        path.unlink(missing_ok=True)
    remove_temporaries(directory)
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
                     for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))


def load_resume_state(directory: Path, student, base, opt: PVOptimizer, result,
                 config: FinetuneConfig, run: dict[str, Any]) -> int:
    from pvtune.checkpoint.format import unpack_state

    path = directory / RESUME_META
    afresh = "delete that folder (or write to another output folder) to start afresh"
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
        step, name, digest = int(meta["step"]), meta["file"], meta["sha256"]
        saved_settings, saved_run = meta["settings"], meta["run"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is damaged or was written by an older pvtune ({err}); "
                              f"{afresh}") from None
    changed = _differences(saved_settings, trajectory_settings(config))
    if changed:
        raise ConfigError(
            f"{directory} holds the resume state of a run with other settings ({changed}); "
            f"run with the same settings to continue it, or {afresh}"
        )
    changed = _differences(saved_run, run)
    if changed:
        keys = ", ".join(k for k in sorted(set(saved_run) | set(run))
                         if saved_run.get(k) != run.get(k))
        raise ConfigError(
            f"{directory} holds the resume state of a run on other inputs ({keys} differ: "
            "another source checkpoint, teacher, calibration text or its sequence count or length, "
            f"evaluation text or BOS choice); run on the same inputs to continue it, or {afresh}"
        )
    tensors_path = directory / name
    if "/" in name or not tensors_path.is_file() or sha256_file(tensors_path) != digest:
        raise CheckpointError(f"{directory}: the resume tensors {name} are missing or damaged "
                              f"(checksum mismatch); {afresh}")
    tensors = load_file(str(tensors_path))
    if int(tensors.get("pv.steps", torch.tensor(-1))) != step:
        raise CheckpointError(f"{directory}: the resume record says step {step} but its tensors "
                              f"hold step {int(tensors.get('pv.steps', torch.tensor(-1)))}; "
                              f"{afresh}")
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    current = student.state_dict()  # sharded parameters take their shard of the whole
    student.load_state_dict({k: placed_like(v, current[k]) if k in current else v
                             for k, v in unpack_state(model_state, meta["layout"]).items()},
                            strict=True)
    optimizer_from_tensors(base, "adam", tensors, meta["adam"])
    opt.load_state_tensors(tensors)
    for key, value in meta["result"].items():
        setattr(result, key, value if not isinstance(value, list)
                else [tuple(v) if isinstance(v, list) else v for v in value])
    return step
