"""Whether a model's inputs start with a BOS token, decided per model the way llama.cpp does.

Some models need a BOS token at the start of every sequence (the report that led to this
rule measured a Gemma-family model at perplexity 65.0 without it against 23.4 with it, and
greedy generation returned nothing; not reproduced here), others were trained without one.
The tokenizer does not always say: a model that transformers converted from GGUF loses the
GGUF's ``tokenizer.ggml.add_bos_token`` flag. The rule, first match wins:

1. the GGUF flag, when pvtune converted the model from GGUF (recorded beside it);
2. the tokenizer's explicit ``add_bos_token`` setting in ``tokenizer_config.json``;
3. the tokenizer adds a BOS token itself when asked for special tokens;
4. the architecture needs one (the Gemma family, as llama.cpp forces) and has a BOS id;
5. otherwise no BOS.

The choice is recorded in every checkpoint and result, and applied the same way in
calibration, evaluation, fine-tuning and generation: :func:`with_bos` prepends the token to
the model's input and the logits of that position are dropped, so the scored tokens are the
same with and without it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pvtune.errors import ConfigError

SOURCE_FILE = "pvtune_source.json"  # written beside a model pvtune converted from GGUF
BOS_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma4",
                     "gemma4_text", "recurrent_gemma")


@dataclass(frozen=True)
class BosChoice:
    """Whether to prepend ``token_id`` to every sequence, and why."""

    add: bool
    token_id: int | None
    reason: str

    def __post_init__(self) -> None:
        if self.add and self.token_id is None:
            raise ConfigError("a BOS token is required but the model has no bos_token_id")

    def to_dict(self) -> dict[str, Any]:
        """JSON record."""
        return asdict(self)

    @staticmethod
    def from_dict(data: Any) -> BosChoice:
        """Inverse of :meth:`to_dict`, with a clear error for a malformed record."""
        if not isinstance(data, dict) or not isinstance(data.get("add"), bool) \
                or not (data.get("token_id") is None or isinstance(data.get("token_id"), int)):
            raise ConfigError(f"malformed BOS record {data!r}: expected add (true/false), "
                              "token_id (int or null) and reason")
        return BosChoice(data["add"], data.get("token_id"), str(data.get("reason", "")))


def _bos_id(tokenizer, config) -> int | None:
    token = getattr(tokenizer, "bos_token_id", None)
    if token is None:
        token = getattr(config, "bos_token_id", None)
    if isinstance(token, list):
        token = token[0] if token else None
    return token if isinstance(token, int) else None


def decide_bos(model_dir: str | Path | None, tokenizer, config,
               override: bool | None = None) -> BosChoice:
    """The BOS choice for a model (see the module docstring); ``override`` (True: always,
    False: never) wins over the rule."""
    token = _bos_id(tokenizer, config)
    if override is not None:
        return BosChoice(override, token if override else None,
                         "asked for" if override else "asked to leave it out")
    directory = Path(model_dir) if model_dir is not None else None
    if directory is not None and (directory / SOURCE_FILE).is_file():
        source = json.loads((directory / SOURCE_FILE).read_text())
        flag = source.get("gguf_metadata", {}).get("tokenizer.ggml.add_bos_token")
        if isinstance(flag, bool):
            return BosChoice(flag and token is not None, token if flag else None,
                             f"GGUF tokenizer.ggml.add_bos_token={str(flag).lower()}")
    if directory is not None and (directory / "tokenizer_config.json").is_file():
        try:
            explicit = json.loads((directory / "tokenizer_config.json").read_text()) \
                .get("add_bos_token")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            explicit = None
        if isinstance(explicit, bool):
            return BosChoice(explicit and token is not None, token if explicit else None,
                             f"tokenizer_config.json add_bos_token={str(explicit).lower()}")
    if token is not None:
        probe = tokenizer("a", add_special_tokens=True).input_ids
        if probe and probe[0] == token:
            return BosChoice(True, token, "the tokenizer adds it")
        if getattr(config, "model_type", None) in BOS_ARCHITECTURES:
            return BosChoice(True, token, f"the {config.model_type} architecture needs it")
    return BosChoice(False, None, "the tokenizer adds none and the architecture needs none")


def run_bos(model_dir: str | Path | None, tokenizer, config, override: bool | None = None,
            meta: dict | None = None) -> BosChoice:
    """The BOS choice to run a model with: a pvtune checkpoint's recorded choice (its record
    ``meta``) when it has one, else :func:`decide_bos`'s rule; ``override`` wins over both."""
    if override is None and meta is not None and "bos" in meta:
        return BosChoice.from_dict(meta["bos"])
    return decide_bos(model_dir, tokenizer, config, override)


def with_bos(ids: Tensor, choice: BosChoice | None) -> Tensor:
    """``ids`` (``[N, L]``) with the BOS token prepended when ``choice.add``."""
    if choice is None or not choice.add:
        return ids
    bos = torch.full((ids.shape[0], 1), choice.token_id, dtype=ids.dtype, device=ids.device)
    return torch.cat([bos, ids], dim=1)


def logits_without_bos(logits: Tensor, choice: BosChoice | None) -> Tensor:
    """Drop the BOS position's logits, so they align with the un-prefixed ``ids``."""
    return logits[:, 1:] if choice is not None and choice.add else logits


def model_logits(model, ids: Tensor, choice: BosChoice | None) -> Tensor:
    """The model's logits for ``ids`` (``[N, L, vocab]``), run with the BOS choice applied."""
    return logits_without_bos(model(input_ids=with_bos(ids, choice), use_cache=False).logits,
                              choice)
