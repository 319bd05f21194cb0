"""Saving and loading quantized models: one safetensors file plus JSON metadata.

Integer codes are bit-packed with each representation's codecs; continuous tensors are
stored as float16 when that is exact and in their own dtype otherwise, so a loaded model
reproduces the saved one's outputs bit for bit. No pickle anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pvtune.nn.quantize import _set_submodule, quantized_layers
from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.packing import codec_from_dict
from pvtune.reprs.base import ReprConfig

FORMAT_NAME = "pvtune-quantized"
FORMAT_VERSION = 1
WEIGHTS_FILE = "pvtune_model.safetensors"
LAYOUT_FILE = "pvtune_layout.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupted or does not fit the model."""


def _exact_fp16(t: Tensor) -> bool:
    if not t.is_floating_point() or t.dtype == torch.float16:
        return False
    if not torch.isfinite(t).all():
        return False
    return bool(torch.equal(t.to(torch.float16).to(t.dtype), t))


def pack_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and JSON layout :func:`save_quantized` writes (exposed for testing)."""
    layout: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "layers": {},
                              "packed": {}, "dtypes": {}, "aliases": {}}
    state = _dedupe_shared(model.state_dict(), layout)
    for name, layer in quantized_layers(model).items():
        layout["layers"][name] = {
            "config": layer.qweight.config.to_dict(),
            "out_features": layer.out_features,
            "in_features": layer.in_features,
            "bias": layer.bias is not None,
        }
        for buf, codec in layer.qweight.integer_codecs().items():
            key = f"{name}.qweight.{buf}"
            codes = state[key]
            state[key] = codec.pack(codes)
            layout["packed"][key] = {**codec.to_dict(), "shape": list(codes.shape),
                                     "dtype": str(codes.dtype).removeprefix("torch.")}
    for key, tensor in list(state.items()):
        if key not in layout["packed"] and _exact_fp16(tensor):
            layout["dtypes"][key] = str(tensor.dtype).removeprefix("torch.")
            state[key] = tensor.to(torch.float16)
    return state, layout


def _dedupe_shared(state: dict[str, Tensor], layout: dict[str, Any]) -> dict[str, Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): keep each once and
    record the other names as aliases."""
    seen: dict[tuple, str] = {}
    out = {}
    for key, t in state.items():
        t = t.detach().cpu()
        ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and ident in seen:
            layout["aliases"][key] = seen[ident]
            continue
        seen[ident] = key
        out[key] = t.contiguous()
    return out


def save_quantized(model: nn.Module, directory: str | Path) -> Path:
    """Write ``model``'s full state (quantized layers packed) to ``directory``; returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state, layout = pack_state(model)
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
    (directory / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))
    return directory


def read_layout(directory: str | Path) -> dict[str, Any]:
    """The JSON layout of a checkpoint, with clear errors for a missing or bad file."""
    path = Path(directory) / LAYOUT_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a pvtune checkpoint: {LAYOUT_FILE} is missing")
    try:
        layout = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is corrupted (not valid JSON: {err})") from None
    if layout.get("format") != FORMAT_NAME or layout.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported format {layout.get('format')!r} v{layout.get('version')}; "
            f"this pvtune reads {FORMAT_NAME} v{FORMAT_VERSION}"
        )
    return layout


def unpack_state(state: dict[str, Tensor], layout: dict[str, Any],
                 source: str = "checkpoint") -> dict[str, Tensor]:
    """Inverse of :func:`pack_state`: unpack codes, restore dtypes and tied aliases."""
    state = dict(state)
    for key, spec in layout["packed"].items():
        if key not in state:
            raise CheckpointError(f"{source} lacks tensor {key!r}: corrupted checkpoint")
        numel = 1
        for d in spec["shape"]:
            numel *= d
        try:
            codes = codec_from_dict(spec).unpack(state[key], numel)
        except ValueError as err:
            raise CheckpointError(f"{source}: tensor {key!r}: {err}") from None
        state[key] = codes.reshape(spec["shape"]).to(getattr(torch, spec["dtype"]))
    for key, dtype in layout["dtypes"].items():
        if key in state:
            state[key] = state[key].to(getattr(torch, dtype))
    for key, alias_of in layout.get("aliases", {}).items():
        state[key] = state[alias_of]
    return state


def load_quantized(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` into ``model`` (in place).

    ``model`` must have the original architecture with plain ``nn.Linear`` layers (or
    already-quantized ones) where the checkpoint has quantized layers.
    """
    directory = Path(directory)
    layout = read_layout(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{directory}: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights} is truncated or corrupted: {err}") from None
    for name, spec in layout["layers"].items():
        try:
            config = ReprConfig.from_dict(spec["config"])
            layer = QuantizedLinear.empty(
                spec["out_features"], spec["in_features"], config, spec["bias"]
            )
            _set_submodule(model, name, layer)
        except (KeyError, AttributeError, TypeError, ValueError) as err:
            raise CheckpointError(f"{directory}: layer {name!r} does not fit the model: {err}") \
                from None
    state = unpack_state(state, layout, source=str(weights))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{directory} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model
