"""Training text in the model's own voice: conversations the uncompressed model writes itself.

A chat model is judged by its answers, yet a sample of Wikipedia holds no chat turn. Here the
teacher writes the data, as data-free quantization-aware training does: for each
conversation it samples a user message after its chat template's opening (temperature
``question_temperature``), then its own answer through the template (``answer_temperature``),
both ending where the model ends its turn. The rendered conversations are joined into one
token stream and cut into ``[num_sequences, sequence_length]`` sequences for calibration and
distillation. Generation is seeded, batch after batch, so a longer stream extends a shorter
one; the stream is cached keyed by the model's fingerprint and the sampling settings, so
compression and fine-tuning see the same tokens and a second run costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from pvtune.checkpoint.files import save_tensors_atomic
from pvtune.errors import DataError
from pvtune.llm.assets import cache_dir
from pvtune.reprs.base import check_int, check_range

log = logging.getLogger(__name__)

_MARK = "\x00pvtune\x00"


@dataclass(frozen=True)
class ChatDataConfig:
    """How teacher-written conversations are sampled (lengths in tokens)."""

    question_tokens: int = 48
    answer_tokens: int = 192
    question_temperature: float = 1.0
    answer_temperature: float = 0.7
    top_p: float = 0.95
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("question_tokens", "answer_tokens", "batch_size"):
            check_int(self, name, getattr(self, name))
            check_range(self, name, getattr(self, name), 1, None)
        for name in ("question_temperature", "answer_temperature"):
            check_range(self, name, getattr(self, name), 0.01, 10.0)
        check_range(self, "top_p", self.top_p, 0.01, 1.0)

    def key(self, fingerprint: str) -> str:
        """The cache key of these settings for a model of ``fingerprint``."""
        text = json.dumps({"model": fingerprint, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def user_prefix(tokenizer) -> str:
    """The chat template's text before the first user message (its system turn, if the
    template adds one); a :class:`DataError` for a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("teacher-written chat data needs a chat template; this tokenizer has "
                        "none (calibrate on text instead)")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                         add_generation_prompt=False)
    return text[: text.index(_MARK)]


def _sample(model: nn.Module, tokenizer, prompts: list[Tensor], max_new: int,
            temperature: float, top_p: float) -> list[Tensor]:
    """Sampled continuations (new tokens only, up to the model's end of turn) of each prompt,
    left-padded into one batch."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel():] = p
        mask[i, width - p.numel():] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                         temperature=temperature, top_p=top_p, top_k=0,
                         max_new_tokens=max_new, pad_token_id=pad)
    new = out[:, width:]
    eos = model.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    pieces = []
    for row in new:
        stop = next((j for j, t in enumerate(row.tolist()) if t in ends), None)
        pieces.append(row if stop is None else row[: stop + 1])
    return pieces


@torch.no_grad()
def write_conversations(model: nn.Module, tokenizer, config: ChatDataConfig, tokens: int,
                        progress: bool = True) -> Tensor:
    """A stream of ``tokens`` token ids of conversations ``model`` writes (see the module
    docstring)."""
    prefix = user_prefix(tokenizer)
    prefix_ids = tokenizer(prefix, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    needed = tokens
    gen = torch.Generator().manual_seed(config.seed)
    stream: list[Tensor] = []
    total = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=needed, desc="chat data", unit="tok", disable=not progress)
    try:
        while total < needed:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            questions = _sample(model, tokenizer, [prefix_ids] * config.batch_size,
                                config.question_tokens, config.question_temperature,
                                config.top_p)
            texts = [tokenizer.decode(q, skip_special_tokens=True).strip() for q in questions]
            texts = [t for t in texts if t]
            if not texts:
                continue
            prompts = [tokenizer.apply_chat_template(
                [{"role": "user", "content": t}], add_generation_prompt=True,
                return_tensors="pt", return_dict=True)["input_ids"][0] for t in texts]
            answers = _sample(model, tokenizer, prompts, config.answer_tokens,
                              config.answer_temperature, config.top_p)
            for p, a in zip(prompts, answers, strict=True):
                conversation = torch.cat([p, a])
                stream.append(conversation)
                total += conversation.numel()
                bar.update(conversation.numel())
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(stream)[:needed]


def chat_sequences(model: nn.Module, tokenizer, config: ChatDataConfig, num_sequences: int,
                   sequence_length: int, fingerprint: str, cache: Path | None,
                   progress: bool = True) -> Tensor:
    """``[num_sequences, sequence_length]`` ids cut from :func:`write_conversations`'s
    stream, cached in ``cache`` (None: no cache); a cached stream at least as long is
    reused (its prefix is what a shorter run writes)."""
    tokens = num_sequences * sequence_length
    path = None if cache is None else Path(cache) / f"chat-{config.key(fingerprint)}.safetensors"
    stream = None
    if path is not None and path.is_file():
        try:
            stream = load_file(str(path))["ids"]
        except (OSError, KeyError, ValueError):
            log.warning("the cached chat data %s is unreadable; writing it again", path)
    if stream is None or stream.numel() < tokens:
        stream = write_conversations(model, tokenizer, config, tokens, progress)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors_atomic({"ids": stream.contiguous()}, path)
    return stream[:tokens].reshape(num_sequences, sequence_length).clone()


def interleave(a: Tensor, b: Tensor) -> Tensor:
    """The rows of ``a`` and ``b`` (same length) alternated, the longer one's rest last, so
    any prefix of the result holds both kinds."""
    if a.shape[1] != b.shape[1]:
        raise DataError(f"cannot mix sequences of {a.shape[1]} and {b.shape[1]} tokens")
    rows = []
    for i in range(max(a.shape[0], b.shape[0])):
        rows += [t[i] for t in (a, b) if i < t.shape[0]]
    return torch.stack(rows)


def add_chat_data(model: nn.Module, tokenizer, ids: Tensor, count: int, fingerprint: str,
                  seed: int) -> tuple[Tensor, dict]:
    """``ids`` interleaved with ``count`` sequences (of ``ids``' length) of conversations
    ``model`` writes itself, cached under the pvtune cache by ``fingerprint``, and the record
    of what was added."""
    config = ChatDataConfig(seed=seed)
    log.info("adding %d sequences of %d tokens of conversations the uncompressed model writes "
             "(cached under %s)", count, ids.shape[1], cache_dir() / "chat_data")
    chat = chat_sequences(model, tokenizer, config, count, ids.shape[1], fingerprint,
                          cache_dir() / "chat_data")
    return interleave(ids, chat), {"sequences": count, **asdict(config)}
