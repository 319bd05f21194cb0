"""Streaming generation with speed figures, and a multi-turn chat session over a model's
chat template (``pvtune chat``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pvtune.errors import DataError
from pvtune.llm.model import check_generation_length


@dataclass(frozen=True)
class GenerationStats:
    """Tokens and speed of one generation: prefill (the prompt) and decode (new tokens)."""

    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens processed per second before the first new token."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens per second after the first one."""
        n = self.new_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0


class _Streamer:
    """A transformers streamer: decodes new tokens as they come, timing each."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.times: list[float] = []
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False

    def put(self, value: Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.on_text(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.on_text(text[self.sent:])
            self.sent = len(text)


@torch.no_grad()
def stream_generate(model: nn.Module, tokenizer, ids: Tensor, max_new_tokens: int,
                    on_text: Callable[[str], None] = lambda s: None,
                    temperature: float = 0.0, seed: int = 0) -> tuple[str, GenerationStats]:
    """Generate up to ``max_new_tokens`` after the prompt ``ids`` (``[1, L]``), passing text
    to ``on_text`` as it is produced; greedy when ``temperature`` is 0. Returns the text and
    its :class:`GenerationStats`."""
    if max_new_tokens < 1:
        raise DataError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_generation_length(model, ids.shape[1], max_new_tokens)
    model.eval()
    streamer = _Streamer(tokenizer, on_text)
    sampling = {"do_sample": False} if temperature <= 0 else \
        {"do_sample": True, "temperature": temperature, "top_p": 0.95}
    torch.manual_seed(seed)
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                   max_new_tokens=max_new_tokens, streamer=streamer,
                   pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
    streamer.end()
    times = streamer.times
    stats = GenerationStats(
        prompt_tokens=ids.shape[1], new_tokens=len(streamer.ids),
        prefill_seconds=(times[0] - start) if times else 0.0,
        decode_seconds=(times[-1] - times[0]) if len(times) > 1 else 0.0)
    return tokenizer.decode(streamer.ids, skip_special_tokens=True), stats


@dataclass
class ChatSession:
    """A conversation: the history of turns, rendered through the tokenizer's chat template
    for every reply."""

    model: nn.Module
    tokenizer: object
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.0
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DataError("this model's tokenizer has no chat template, so it cannot chat; "
                            "use `pvtune generate` to continue plain text")
        check_generation_length(self.model, 1, self.max_new_tokens)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history.clear()

    def reply(self, message: str,
              on_text: Callable[[str], None] = lambda s: None) -> tuple[str, GenerationStats]:
        """The model's streamed answer to ``message``, added to the history with it."""
        if not message.strip():
            raise DataError("empty message")
        turns = ([{"role": "system", "content": self.system}] if self.system else []) \
            + self.history + [{"role": "user", "content": message}]
        ids = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                                 return_tensors="pt", return_dict=True)
        text, stats = stream_generate(self.model, self.tokenizer, ids["input_ids"],
                                      self.max_new_tokens, on_text, self.temperature,
                                      seed=len(self.history))
        self.history += [{"role": "user", "content": message},
                         {"role": "assistant", "content": text.strip()}]
        return text, stats
