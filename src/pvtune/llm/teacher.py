"""Which model teaches a fine-tune: the one a checkpoint records it was compressed from, or
one the user names, checked before any work.

A checkpoint records its source as an absolute path (a model folder or a GGUF file),
:data:`DEFAULT_MODEL` for the offline default model, or a hub id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvtune.errors import CheckpointError, ModelError
from pvtune.llm.model import looks_local
from pvtune.llm.sources import DEFAULT_MODEL


@dataclass(frozen=True)
class FinetuneRecord:
    """What fine-tuning reads from a compressed checkpoint's record, type-checked."""

    source_model: str | None
    dense_storage: str
    bos: Any

    @classmethod
    def of(cls, meta: dict, checkpoint: Path) -> FinetuneRecord:
        """The checked entries of ``meta`` (a :class:`CheckpointError` for malformed ones)."""
        recorded = meta.get("source_model")
        if recorded is not None and not isinstance(recorded, str):
            raise CheckpointError(f"{checkpoint}: its record's source_model must be a string, "
                                  f"got {recorded!r}")
        compress = meta.get("compress_config", {})
        storage = (compress or {}).get("dense_storage", "float16") \
            if isinstance(compress, dict) else None
        if storage not in ("float16", "float32"):
            raise CheckpointError(f"{checkpoint}: its record's compress_config.dense_storage "
                                  f"must be float16 or float32, got {storage!r}")
        return cls(recorded, storage, meta.get("bos"))


@dataclass(frozen=True)
class Teacher:
    """The teacher of a fine-tune: ``source`` for :func:`~pvtune.llm.model.load_causal_lm`
    (None: the default model), ``path`` its local folder or file (None for the default
    model or a hub id), ``name`` how the fine-tune's record names it."""

    source: str | None
    path: Path | None
    name: str


def resolve_teacher(checkpoint: Path, record: FinetuneRecord, teacher: str | None) -> Teacher:
    """The named ``teacher``, else the model ``checkpoint`` was compressed from; a
    :class:`ModelError` when that cannot be used (none recorded, a relative path an older
    pvtune wrote, a model that no longer exists, the checkpoint itself)."""
    source = teacher
    if source is None:
        if record.source_model is None:
            raise ModelError(f"{checkpoint} does not record the model it was compressed from; "
                             "name the uncompressed model as the teacher")
        source = None if record.source_model == DEFAULT_MODEL else record.source_model
        if source is not None and looks_local(source):
            path = Path(source).expanduser()
            if not path.is_absolute():
                raise ModelError(f"{checkpoint} records its source model as the relative path "
                                 f"{source!r} (an older pvtune), which may name another model "
                                 "from here; name the uncompressed model as the teacher")
            if not path.exists():
                raise ModelError(f"{checkpoint} was compressed from {source}, which no longer "
                                 "exists; name the uncompressed model as the teacher")
    path = Path(source).expanduser() if source is not None and looks_local(source) else None
    if path is not None and path.resolve() == Path(checkpoint).expanduser().resolve():
        raise ModelError("the teacher is the checkpoint being fine-tuned: the student would be "
                         "its own teacher; name the uncompressed model")
    name = str(path.resolve()) if path is not None else (source or DEFAULT_MODEL)
    return Teacher(source, path, name)
