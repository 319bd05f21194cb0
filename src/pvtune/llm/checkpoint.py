"""Compressed LLM checkpoints: the Hugging Face config and tokenizer, plus pvtune's
safetensors weights (codes bit-packed) and a JSON record of how the model was made.

The record lives inside ``pvtune_layout.json`` (the checkpoint's commit point, see
:mod:`pvtune.checkpoint.format`); ``pvtune_meta.json`` is a readable copy of it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvtune.checkpoint.files import TMP_MARK, replace_durably, write_json_atomic, writing
from pvtune.checkpoint.format import (
    LAYOUT_FILE,
    load_quantized,
    pack_state,
    read_layout,
    save_quantized,
    storage_report,
    update_meta,
)
from pvtune.errors import CheckpointError, OutputError

META_FILE = "pvtune_meta.json"
CONFIG_FILE = "config.json"


def save_compressed(model: nn.Module, tokenizer, directory: str | Path,
                    meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a directory that :func:`load_compressed` (and ``pvtune eval``) can load; returns
    the record saved with it, whose ``"bits"`` are computed from the bytes written.

    Crash-safe: the Hugging Face files are replaced one by one, atomically, and the layout
    that ties them to the weights is written last, so a failed write (a full disk) leaves
    the checkpoint the folder held before loadable; it raises one :class:`OutputError`
    naming the folder and the cause.
    """
    directory = Path(directory)
    kept = ("the checkpoint it held before is unchanged" if (directory / LAYOUT_FILE).is_file()
            else "no checkpoint was saved there")
    with writing(directory, kept):
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=f".hf{TMP_MARK}-") as tmp:
            model.config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for path in Path(tmp).iterdir():
                if path.is_file():
                    replace_durably(path, directory / path.name)
        record = save_quantized(model, directory, meta=meta, companions=(CONFIG_FILE,))["meta"]
        write_json_atomic(directory / META_FILE, record)
    return record


def save_or_rescue(model: nn.Module, tokenizer, directory: str | Path,
                   meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`save_compressed`; when ``directory`` cannot be written, the same checkpoint goes
    to a rescue folder among the system's temporary files, and the :class:`OutputError`
    names where the model is (or that it could not be saved anywhere): finished work is
    never lost silently."""
    directory = Path(directory)
    try:
        return save_compressed(model, tokenizer, directory, meta)
    except OutputError as err:
        rescue = Path(tempfile.gettempdir()) / f"pvtune-rescued-{directory.name}-{os.getpid()}"
        try:
            save_compressed(model, tokenizer, rescue, meta)
        except OutputError as second:
            raise OutputError(f"{err}; the model could not be saved elsewhere either "
                              f"({second})") from None
        raise OutputError(f"{err}; the model is saved in {rescue} instead: move it where it "
                          "belongs") from None


def config_record(obj: Any) -> Any:
    """A config (frozen dataclasses, nested) as the JSON a checkpoint's record keeps: each
    dataclass a dict of its fields with its class name under ``"type"``."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: config_record(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return {"type": type(obj).__name__, **fields}
    if isinstance(obj, tuple | list):
        return [config_record(v) for v in obj]
    return obj


def write_meta(directory: str | Path, record: dict[str, Any]) -> None:
    """Replace the record of a saved checkpoint (and its readable copy)."""
    update_meta(directory, record)
    write_json_atomic(Path(directory) / META_FILE, record)


def load_compressed(directory: str | Path):
    """``(model, tokenizer)`` from a directory written by :func:`save_compressed`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pvtune.llm.tokenizer import load_tokenizer, transformers_load_errors

    directory = Path(directory)
    read_layout(directory)  # a clear error for an incomplete or damaged checkpoint first
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(f"{directory} is not a complete pvtune checkpoint: "
                              f"{CONFIG_FILE} is missing")
    try:
        config = AutoConfig.from_pretrained(directory)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except transformers_load_errors() as err:
        raise CheckpointError(f"{directory}/{CONFIG_FILE} does not describe a model "
                              f"transformers can build: {err}") from None
    tokenizer = load_tokenizer(directory)
    load_quantized(model, directory)
    model.eval()
    return model, tokenizer


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The JSON record saved with a compressed model (checked with its layout)."""
    directory = Path(directory)
    layout = read_layout(directory)
    if layout["version"] == 1:  # format v1 kept the record in a separate file
        path = directory / META_FILE
        try:
            meta = json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{path} is corrupted (not valid JSON: {err})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        return meta
    return layout["meta"]


def bits_report(model: nn.Module) -> dict[str, Any]:
    """Bits per parameter from the bytes a save of ``model`` writes: overall (embeddings and
    head included, tied weights counted once) and over the compressed linear layers only;
    plus a per-layer table (see :func:`pvtune.checkpoint.format.storage_report`)."""
    state, _ = pack_state(model)
    return storage_report(model, state)


def size_on_disk(directory: str | Path) -> int:
    """Bytes of every file in the checkpoint directory (sub-folders such as resume state and
    teacher caches excluded)."""
    return sum(p.stat().st_size for p in Path(directory).iterdir() if p.is_file())


__all__ = ["LAYOUT_FILE", "META_FILE", "bits_report", "load_compressed", "read_meta",
           "save_compressed", "size_on_disk", "write_meta"]
