"""Perplexity, throughput and greedy generation for causal LMs."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pvtune.distributed import DistributedContext
from pvtune.errors import DataError
from pvtune.llm.bos import BosChoice, model_logits, with_bos
from pvtune.llm.model import check_generation_length

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity over ``tokens`` predicted tokens, and forward throughput."""

    perplexity: float
    tokens: int
    windows: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Evaluated tokens per second of forward pass."""
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: Tensor, batch_size: int = 4, progress: bool = True,
    bos: BosChoice | None = None, dist: DistributedContext | None = None,
) -> PerplexityResult:
    """``exp(mean NLL)`` of each window's tokens 2..L given their prefixes, the BOS token
    prepended when ``bos`` says so (the scored tokens are the same either way). A diverged
    model gives ``inf`` (or ``nan``), never an overflow error.

    ``dist`` (a data-parallel run, every rank calling with the same windows) splits the
    batches across the ranks and sums their NLL: every rank returns the same perplexity. Each
    rank runs the same number of forward passes (a rank short of batches repeats one and
    discards it), as FSDP's gathers inside the forward need."""
    model.eval()
    dist = dist or DistributedContext()
    nll, count = 0.0, 0
    start = time.perf_counter()
    batches = list(range(0, windows.shape[0], batch_size))
    rounds = math.ceil(len(batches) / dist.world_size)
    for r in tqdm(range(rounds), desc="perplexity", disable=not progress, unit="batch",
                  leave=False):
        b = r * dist.world_size + dist.rank
        s = batches[b] if b < len(batches) else 0
        ids = windows[s : s + batch_size]
        logits = model_logits(model, ids, bos)[:, :-1].float()
        if b >= len(batches):  # a stand-in forward (FSDP gathers in it): not counted
            continue
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                     ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    if dist.active:
        totals = torch.tensor([nll, count], dtype=torch.float64, device=dist.device)
        dist.sum_(totals)
        nll, count = float(totals[0]), int(totals[1])
    seconds = time.perf_counter() - start
    mean = nll / count
    value = math.exp(mean) if mean < 709 else (mean if math.isnan(mean) else math.inf)
    return PerplexityResult(value, count, windows.shape[0], seconds)


def evaluation_record(model: nn.Module, windows: Tensor, label: str,
                      bos: BosChoice | None = None) -> dict:
    """:func:`perplexity` of ``model`` (``label`` names it in the log) as a checkpoint
    records it: perplexity, tokens, tokens per second."""
    log.info("evaluating the %s on %d windows of %d tokens", label, windows.shape[0],
             windows.shape[1])
    result = perplexity(model, windows, bos=bos)
    log.info("%s: perplexity %.3f on %d tokens (%.0f tokens/s)", label, result.perplexity,
             result.tokens, result.tokens_per_second)
    return {"perplexity": result.perplexity, "tokens": result.tokens,
            "tokens_per_second": result.tokens_per_second}


def prompt_ids(tokenizer, prompt: str, chat: bool = False,
               bos: BosChoice | None = None) -> Tensor:
    """``[1, L]`` token ids of ``prompt``: through the chat template when ``chat`` (and the
    tokenizer has one), else as plain text with the BOS token when ``bos`` says so."""
    if not prompt:
        raise DataError("the prompt is empty: give some text to continue")
    if chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )["input_ids"]
    return with_bos(tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
                    .input_ids, bos)


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40,
             chat: bool = False, bos: BosChoice | None = None) -> str:
    """Greedy continuation of ``prompt`` (through the chat template when ``chat``, else with
    the BOS token prepended when ``bos`` says so)."""
    if not prompt:
        raise DataError("the prompt is empty: give some text to continue")
    if max_new_tokens < 0:
        raise DataError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model.eval()
    ids = prompt_ids(tokenizer, prompt, chat, bos)
    check_generation_length(model, ids.shape[1], max_new_tokens)
    if max_new_tokens == 0:
        return ""
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
