"""Torch optimizer state as flat tensors + JSON, so it saves with safetensors (no pickle)."""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor

from pvtune.distributed import placed_like


def optimizer_to_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, Tensor],
                                                                           dict[str, Any]]:
    """Split ``opt.state_dict()`` into tensors (``prefix.i.key``) and JSON-able metadata."""
    sd = opt.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value.detach().clone().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, Tensor],
                           meta: dict[str, Any]) -> None:
    """Load state written by :func:`optimizer_to_tensors` into ``opt`` (whole tensors: a
    sharded parameter's state is split the way the parameter is)."""
    params = [p for group in opt.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith(prefix + "."):
            continue
        idx, name = key[len(prefix) + 1:].split(".", 1)
        # a sharded parameter (FSDP) takes this rank's shard of the saved whole state
        state.setdefault(int(idx), {})[name] = placed_like(value, params[int(idx)])
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    opt.load_state_dict({"state": state, "param_groups": json.loads(json.dumps(
        meta["param_groups"]))})
