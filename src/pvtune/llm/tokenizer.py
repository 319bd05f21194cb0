"""Loading tokenizers through transformers, and what transformers raises for a folder it
cannot use (a leaf module: model and checkpoint loading both build on it)."""

from __future__ import annotations

from pathlib import Path

from pvtune.errors import ModelError


def transformers_load_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a config or model folder it cannot use (its strict
    config dataclasses raise huggingface_hub's own validation error)."""
    from huggingface_hub.errors import StrictDataclassError

    return (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            StrictDataclassError)


def load_tokenizer(source: str | Path):
    """The tokenizer of a model directory (or hub id), or a :class:`ModelError` saying what
    is missing."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except transformers_load_errors() as err:
        tokenizer, reason = None, " (" + " ".join(str(err).split()).rstrip(".") + ")"
    else:
        reason = ""
    if tokenizer is None or not callable(tokenizer):
        raise ModelError(
            f"{source} has no usable tokenizer{reason}; copy the tokenizer files "
            "(tokenizer.json, tokenizer_config.json, ...) from the source model into it"
        )
    return tokenizer
