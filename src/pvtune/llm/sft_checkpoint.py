"""``sft_checkpoint``: the whole job ``pvtune sft`` runs: load a model and an instruction set,
fine-tune it with quantized weights, activations and KV cache (:func:`pvtune.llm.sft.sft`),
measure it, save it as a pvtune checkpoint::

    outcome = sft_checkpoint(None, Path("smol-w4a4"), SFTJob(SFTConfig(steps=200)))
    outcome.record["evaluation"]["answer_perplexity_after"], outcome.record["rouge_l"]

The rules it owns: the output is refused before any work when writing there would lose
work and locked while the job runs; evaluation examples never appear in training
(``offline:sharegpt`` has its own split; a user's file gives every tenth example to
evaluation unless ``eval_data`` names another file); the answer perplexity is measured on
the evaluation examples before and after training, and ROUGE-L of greedy answers on the
first ``answer_examples`` of them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvtune.errors import ConfigError
from pvtune.llm.checkpoint import config_record, save_or_rescue, size_on_disk
from pvtune.llm.model import check_generation_length, count_params, load_causal_lm
from pvtune.llm.outputs import check_space, prepare_output
from pvtune.llm.sft import SFTConfig, SFTResult, rouge_l, sft
from pvtune.llm.sft_data import OFFLINE_SFT, SFTExample, read_sft_examples, tokenize_examples
from pvtune.llm.sources import REFERENCE_NOTE, model_source

log = logging.getLogger(__name__)

EVAL_EVERY = 10  # a user's file: example i is for evaluation when i % 10 == 9


@dataclass(frozen=True)
class SFTJob:
    """What one ``pvtune sft`` run asks for: ``config`` (the training), ``data`` and
    ``eval_data`` (sources, see :mod:`pvtune.llm.sft_data`; None: ``offline:sharegpt`` and
    its evaluation split), at most ``train_examples`` / ``eval_examples`` of them,
    ``answer_examples`` greedy answers of at most ``max_new_tokens`` scored by ROUGE-L,
    ``overwrite``: write into a non-empty output."""

    config: SFTConfig = field(default_factory=SFTConfig)
    data: str | None = None
    eval_data: str | None = None
    train_examples: int | None = None
    eval_examples: int = 64
    answer_examples: int = 16
    max_new_tokens: int = 64
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.config, SFTConfig):
            raise ConfigError("SFTJob.config must be an SFTConfig")
        for name in ("eval_examples", "answer_examples", "max_new_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SFTJob.{name} must be >= 0")


@dataclass
class SFTOutcome:
    """The fine-tuned model, where it was saved, and the record saved with it."""

    model: nn.Module
    tokenizer: Any
    output: Path
    record: dict[str, Any]
    result: SFTResult


def split_examples(job: SFTJob) -> tuple[list[SFTExample], list[SFTExample]]:
    """Training and evaluation examples of ``job`` (module docstring for the rules)."""
    source = job.data or OFFLINE_SFT
    if source == OFFLINE_SFT or job.eval_data is not None:  # (a file has no splits)
        train = read_sft_examples(source, "train")
        evaluation = read_sft_examples(job.eval_data or OFFLINE_SFT, "evaluation")
    else:
        every = read_sft_examples(source)
        train = [e for i, e in enumerate(every) if i % EVAL_EVERY != EVAL_EVERY - 1]
        evaluation = [e for i, e in enumerate(every) if i % EVAL_EVERY == EVAL_EVERY - 1]
    seen = set(train)
    shared = sum(e in seen for e in evaluation)
    if shared:
        log.warning("%d of %d evaluation examples also appear in the training data: their "
                    "figures are not on unseen examples", shared, len(evaluation))
    if job.train_examples is not None:
        train = train[:job.train_examples]
    return train, evaluation[:job.eval_examples]


@torch.no_grad()
def answers(model: nn.Module, tokenizer, examples: list[SFTExample], max_new_tokens: int
            ) -> list[dict[str, Any]]:
    """Greedy answers to ``examples`` through the chat template, with ROUGE-L against each
    reference."""
    out = []
    model.eval()
    for example in examples:
        messages = [{"role": r, "content": c} for r, c in example.messages]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        check_generation_length(model, ids.shape[1], max_new_tokens)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        out.append({"prompt": example.prompt, "reference": example.response, "answer": text,
                    "rouge_l": rouge_l(text, example.response)})
    return out


def sft_checkpoint(model: str | Path | None, output: Path, job: SFTJob,
                   progress: bool = True) -> SFTOutcome:
    """Run ``job`` on ``model`` (a folder, GGUF file or hub id; None: the offline default
    model) and save the result to ``output``; the record has the training curve, the
    answer perplexity before and after, ROUGE-L and the answers. Raises
    :class:`~pvtune.errors.OutputError` for an output that would lose work,
    :class:`~pvtune.errors.DataError` for unusable data, before the long work."""
    config = job.config
    torch.manual_seed(config.seed)
    source = model_source(model)
    output = Path(output)
    lock = prepare_output(output, job.overwrite, {"source model folder": source.path})
    try:
        t0 = time.perf_counter()
        net, tokenizer = load_causal_lm(source.loadable)
        check_space(output, 2 * count_params(net))
        train_ex, eval_ex = split_examples(job)
        train = tokenize_examples(tokenizer, train_ex, config.max_length)
        evaluation = tokenize_examples(tokenizer, eval_ex, config.max_length) if eval_ex else []
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        log.info("loaded %s in %.1f s; %d training and %d evaluation examples", source.record,
                 time.perf_counter() - t0, len(train), len(evaluation))
        result = sft(net, train, evaluation, config, pad, progress=progress)
        graded = answers(net, tokenizer, eval_ex[:job.answer_examples], job.max_new_tokens)
        record: dict[str, Any] = {
            "source_model": source.record, "sft_config": config_record(config),
            "data": job.data or OFFLINE_SFT, "eval_data": job.eval_data or job.data
            or OFFLINE_SFT, "training_examples": len(train),
            "evaluation": {
                "examples": len(evaluation),
                "answer_loss_before": result.eval_before,
                "answer_loss_after": result.eval_after,
                "answer_perplexity_before": _exp(result.eval_before),
                "answer_perplexity_after": _exp(result.eval_after)},
            "rouge_l": (sum(a["rouge_l"] for a in graded) / len(graded)) if graded else None,
            "answers": graded, "training": result.to_dict()}
        if result.rotations is not None:
            record["activation_rotations"] = result.rotations.to_dict()
        if source.is_default:
            record["reference_note"] = REFERENCE_NOTE
        saved = save_or_rescue(net, tokenizer, output, record)
        record["size_bytes"] = size_on_disk(output)
        record["bits"] = saved.get("bits")
        return SFTOutcome(net, tokenizer, output, record, result)
    finally:
        lock.release()


def _exp(x: float | None) -> float | None:
    return None if x is None else math.exp(min(x, 700.0))


__all__ = ["SFTJob", "SFTOutcome", "answers", "sft_checkpoint", "split_examples"]
