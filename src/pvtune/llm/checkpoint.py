"""Compressed LLM checkpoints: the Hugging Face config and tokenizer, plus pvtune's
safetensors weights (codes bit-packed) and a JSON record of how the model was made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvtune.checkpoint.format import LAYOUT_FILE, WEIGHTS_FILE, CheckpointError, load_quantized
from pvtune.checkpoint.format import save_quantized as _save_weights
from pvtune.nn.quantize import quantized_layers

META_FILE = "pvtune_meta.json"


def save_compressed(model: nn.Module, tokenizer, directory: str | Path,
                    meta: dict[str, Any] | None = None) -> Path:
    """Write a directory that :func:`load_compressed` (and ``pvtune eval``) can load."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    _save_weights(model, directory)
    record = {"bits": bits_report(model), **(meta or {})}
    (directory / META_FILE).write_text(json.dumps(record, indent=1, default=str))
    return directory


def load_compressed(directory: str | Path):
    """``(model, tokenizer)`` from a directory written by :func:`save_compressed`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    for needed in ("config.json", LAYOUT_FILE, WEIGHTS_FILE):
        if not (directory / needed).is_file():
            raise CheckpointError(f"{directory} is not a complete pvtune checkpoint: "
                                  f"{needed} is missing")
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory}/config.json is unreadable: {err}") from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_quantized(model, directory)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The JSON record saved with a compressed model (empty if absent)."""
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _stored_bits(t: torch.Tensor) -> int:
    if t.dtype == torch.float16 or torch.equal(t.to(torch.float16).to(t.dtype), t):
        return 16
    return t.element_size() * 8


def bits_report(model: nn.Module) -> dict[str, Any]:
    """Bits per parameter: overall (embeddings and head included, tied weights counted once)
    and over the compressed linear layers only; plus a per-layer table."""
    layers = quantized_layers(model)
    quant_ids = {id(p) for m in layers.values() for p in m.qweight.parameters()}
    linear_params = sum(m.in_features * m.out_features for m in layers.values())
    linear_bits = sum(m.bits_per_param() * m.in_features * m.out_features
                      for m in layers.values())
    dense_params = dense_bits = 0
    seen = set()
    for p in model.parameters():
        if id(p) in seen or id(p) in quant_ids:
            continue
        seen.add(id(p))
        dense_params += p.numel()
        dense_bits += p.numel() * _stored_bits(p.detach())
    total = linear_params + dense_params
    return {
        "overall_bits_per_param": (linear_bits + dense_bits) / total if total else 0.0,
        "linear_bits_per_param": linear_bits / linear_params if linear_params else 0.0,
        "params_total": total,
        "params_compressed": linear_params,
        "layers": {n: {"shape": [m.out_features, m.in_features],
                       "bits_per_param": m.bits_per_param(),
                       "representation": m.qweight.config.type_name}
                   for n, m in layers.items()},
    }


def size_on_disk(directory: str | Path) -> int:
    """Bytes of every file in the checkpoint directory."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
