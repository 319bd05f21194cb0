"""Where a model comes from, and how a checkpoint records it.

A checkpoint records its source as an absolute path (a model folder or a GGUF file),
:data:`DEFAULT_MODEL` for the offline default model, or a hub id::

    source = model_source("model.gguf")   # ModelSource(record="/abs/model.gguf", path=...)
    load_causal_lm(source.path or source.record)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pvtune.errors import PvtuneError
from pvtune.llm.bos import SOURCE_FILE

DEFAULT_MODEL = "default:SmolLM2-135M-Instruct"  # how a record names the default model
REFERENCE_NOTE = ("the offline default model is SmolLM2-135M-Instruct's Q4_1 GGUF dequantized "
                  "to fp32: its 'reference' figures are those of a 4-bit model")


@dataclass(frozen=True)
class ModelSource:
    """A model a user names: ``record`` is how a checkpoint records it, ``path`` its local
    folder (a GGUF file's prepared folder; None for a hub id)."""

    record: str
    path: Path | None

    @property
    def is_default(self) -> bool:
        """Whether this is the offline default model."""
        return self.record == DEFAULT_MODEL

    @property
    def loadable(self) -> str | Path:
        """What :func:`~pvtune.llm.model.load_causal_lm` takes for it."""
        return self.path if self.path is not None else self.record


def model_source(model: str | Path | None) -> ModelSource:
    """The source of a model argument: None for the offline default model (prepared and
    verified once), a model folder, a ``.gguf`` file (converted once into a cached folder),
    or a hub id."""
    if model is None:
        from pvtune.llm.assets import default_model_dir

        return ModelSource(DEFAULT_MODEL, default_model_dir())
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        from pvtune.llm.assets import prepared_gguf_dir

        return ModelSource(str(path.resolve()), prepared_gguf_dir(path))
    if path.exists():
        return ModelSource(str(path.resolve()), path.resolve())
    return ModelSource(str(model), None)


def recorded_model(recorded: str) -> str | None:
    """What a record's source names for :func:`model_source` (None: the default model)."""
    return None if recorded == DEFAULT_MODEL else recorded


def reference_source(meta: dict) -> ModelSource | None:
    """The model a checkpoint was compressed from, by its record ``meta`` (None when the
    record names none)."""
    recorded = meta.get("source_model")
    return model_source(recorded_model(recorded)) if isinstance(recorded, str) else None


def recorded_gguf(meta: dict) -> dict:
    """GGUF metadata recorded beside a checkpoint's source model (pre-tokenizer, BOS flag),
    read from its record ``meta``; empty when there is none."""
    recorded = meta.get("source_model")
    if not isinstance(recorded, str):
        return {}
    try:
        directory = model_source(recorded_model(recorded)).path
    except PvtuneError:  # a GGUF source that no longer converts: nothing recorded
        return {}
    return gguf_metadata_beside(directory)


def gguf_metadata_beside(directory: Path | None) -> dict:
    """GGUF metadata pvtune recorded in a model folder it converted from a GGUF file (empty
    for any other folder, or None)."""
    if directory is None:
        return {}
    try:
        return json.loads((directory / SOURCE_FILE).read_text()).get("gguf_metadata", {})
    except (OSError, ValueError, AttributeError):
        return {}


__all__ = ["DEFAULT_MODEL", "REFERENCE_NOTE", "ModelSource", "gguf_metadata_beside",
           "model_source", "recorded_gguf", "recorded_model"]
