"""Quantization-aware supervised fine-tuning (RoSTE): an instruction set's answers as the
loss, while weights, activations and the KV cache are quantized.

Order of work: rotations and activation/KV quantizers first, chosen per layer on training
samples (:mod:`pvtune.llm.activation_quant`); then the decoder linears' weights are put in
training form by a **weight mode** (an open registry, :func:`register_weight_mode`):

- ``float``: full-precision weights (the SFT baseline; quantizers still apply if asked);
- ``ste``: RoSTE's own: latent float weights, projected to per-output-channel asymmetric
  round-to-nearest in every forward pass, the gradient straight through (QAT); frozen to
  codes at the end;
- ``pv``: PV-Tuning: the weights are codes from the start (round-to-nearest on the same
  grid), the continuous parameters trained by AdamW and the codes by a discrete step
  (``subspace_v_ste`` by default).

Each step is a batch of examples, the loss the mean cross-entropy on the answer tokens
(:func:`pvtune.llm.sft_data.answer_loss`), AdamW under a cosine schedule. The result is an
ordinary pvtune checkpoint: its weights in a pvtune representation, its activation and KV
quantizers and online rotations saved with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pvtune.errors import ConfigError, TrainingError
from pvtune.llm.activation_quant import (
    ActivationKVConfig,
    RotationChoice,
    prepare_activation_quant_,
)
from pvtune.llm.finetune import lr_factor
from pvtune.llm.model import find_blocks
from pvtune.llm.sft_data import IGNORE, SFTBatch, answer_loss, collate
from pvtune.nn.quantize import quantize_
from pvtune.optim.pv import PVOptimizer, continuous_parameters
from pvtune.optim.strategies import VStepConfig
from pvtune.qat import QATConfig, freeze_, prepare_qat_
from pvtune.registry import Registry
from pvtune.reprs.uniform import UniformConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTConfig:
    """Settings of quantization-aware SFT.

    ``weights``: the weight mode (module docstring) at ``weight_bits`` per weight (one
    asymmetric grid per output row); ``activations``: quantized activations and KV cache
    with their rotations (None: none); ``steps`` AdamW steps of ``batch_size`` examples of
    at most ``max_length`` tokens, ``lr`` under a ``cosine`` or ``constant`` schedule with
    ``warmup_steps``; ``selection_samples`` token rows of 128 for the rotation choice;
    ``code_lr`` and ``strategy``: PV-Tuning's discrete step (None: its default)."""

    weights: str = "ste"
    weight_bits: int = 4
    activations: ActivationKVConfig | None = field(default_factory=ActivationKVConfig)
    steps: int = 100
    batch_size: int = 4
    max_length: int = 256
    lr: float = 2e-5
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    selection_samples: int = 128
    strategy: str = "subspace_v_ste"
    code_lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        WEIGHT_MODES.get(self.weights)
        for name in ("steps", "batch_size", "max_length", "selection_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"SFTConfig.{name} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.weight_bits, int) or not 2 <= self.weight_bits <= 8:
            raise ConfigError(f"SFTConfig.weight_bits must be in [2, 8], got "
                              f"{self.weight_bits!r}")
        if not self.lr > 0:
            raise ConfigError(f"SFTConfig.lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"SFTConfig.schedule must be cosine or constant, got "
                              f"{self.schedule!r}")
        if self.activations is not None and not isinstance(self.activations,
                                                           ActivationKVConfig):
            raise ConfigError("SFTConfig.activations must be an ActivationKVConfig or None")
        VStepConfig(strategy=self.strategy, lr=self.code_lr)  # validates both

    @property
    def weight_representation(self) -> UniformConfig:
        """Per-output-channel asymmetric round-to-nearest at ``weight_bits``."""
        return UniformConfig(bits=self.weight_bits, group_size=None, symmetric=False)


class Stepper(Protocol):
    """What a weight mode trains with."""

    def zero_grad(self) -> None: ...
    def step(self, lr_scale: float) -> None: ...


class WeightMode(Protocol):
    """How a weight mode prepares the decoder linears, trains them, and finishes."""

    def prepare(self, model: nn.Module, config: SFTConfig) -> None: ...
    def stepper(self, model: nn.Module, config: SFTConfig) -> Stepper: ...
    def finish(self, model: nn.Module) -> None: ...


WEIGHT_MODES: Registry[str, Callable[[], WeightMode]] = Registry("SFT weight mode")


def register_weight_mode(name: str):
    """Class decorator: ``SFTConfig(weights=name)`` trains with this class."""
    return WEIGHT_MODES.decorator(name)


def _in_blocks(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    prefix = find_blocks(model).path + "."
    return lambda module, name: name.startswith(prefix)


class _AdamW:
    def __init__(self, model: nn.Module, config: SFTConfig) -> None:
        self.opt = torch.optim.AdamW(continuous_parameters(model), lr=config.lr,
                                     weight_decay=config.weight_decay)
        self.base = config.lr

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, lr_scale: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.base * lr_scale
        self.opt.step()


@register_weight_mode("float")
class FloatWeights:
    """Full-precision weights, trained by AdamW."""

    def prepare(self, model: nn.Module, config: SFTConfig) -> None:
        pass

    def stepper(self, model: nn.Module, config: SFTConfig) -> Stepper:
        return _AdamW(model, config)

    def finish(self, model: nn.Module) -> None:
        pass


@register_weight_mode("ste")
class STEWeights:
    """Latent float weights through round-to-nearest with the straight-through estimator;
    frozen to codes at the end."""

    def prepare(self, model: nn.Module, config: SFTConfig) -> None:
        prepare_qat_(model, QATConfig(config.weight_representation, estimator="ste"),
                     filter_fn=_in_blocks(model))

    def stepper(self, model: nn.Module, config: SFTConfig) -> Stepper:
        return _AdamW(model, config)

    def finish(self, model: nn.Module) -> None:
        freeze_(model)


@register_weight_mode("pv")
class PVWeights:
    """Codes from round-to-nearest, trained by PV-Tuning (AdamW for the continuous
    parameters, a discrete step for the codes)."""

    def prepare(self, model: nn.Module, config: SFTConfig) -> None:
        quantize_(model, config.weight_representation, filter_fn=_in_blocks(model))

    def stepper(self, model: nn.Module, config: SFTConfig) -> Stepper:
        base = torch.optim.AdamW(continuous_parameters(model), lr=config.lr,
                                 weight_decay=config.weight_decay)
        return PVOptimizer(model, base, VStepConfig(strategy=config.strategy,
                                                    lr=config.code_lr, seed=config.seed))

    def finish(self, model: nn.Module) -> None:
        pass


@dataclass
class SFTResult:
    """What :func:`sft` did: the rotations chosen, the loss per step, the answer loss on the
    evaluation examples before and after, and the time."""

    rotations: RotationChoice | None
    losses: list[float] = field(default_factory=list)
    eval_before: float | None = None
    eval_after: float | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {"rotations": None if self.rotations is None else self.rotations.to_dict(),
                "losses": self.losses, "eval_answer_loss_before": self.eval_before,
                "eval_answer_loss_after": self.eval_after, "seconds": self.seconds}


def selection_rows(items: list[tuple[list[int], list[int]]], rows: int, length: int = 128
                   ) -> Tensor:
    """``[n, length]`` token rows cut from the examples laid end to end (at most ``rows``),
    for the rotation choice."""
    stream = [t for ids, _ in items for t in ids]
    n = min(rows, len(stream) // length)
    if n == 0:
        raise ConfigError(f"the training examples hold {len(stream)} tokens: fewer than one "
                          f"row of {length} for choosing rotations")
    return torch.tensor(stream[:n * length]).reshape(n, length)


@torch.no_grad()
def answer_loss_of(model: nn.Module, items: list[tuple[list[int], list[int]]], pad_id: int,
                   batch_size: int = 8) -> float:
    """Mean cross-entropy per answer token over ``items`` (its exp is the answer
    perplexity)."""
    was = model.training
    model.eval()
    total = count = 0.0
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size], pad_id)
        logits = model(input_ids=batch.input_ids.to(device),
                       attention_mask=batch.attention_mask.to(device)).logits
        n = int((batch.labels[:, 1:] != IGNORE).sum())
        if n:
            total += float(answer_loss(logits, batch.labels.to(device))) * n
            count += n
    model.train(was)
    return total / max(count, 1)


def _batch(items, config: SFTConfig, step: int, pad_id: int) -> SFTBatch:
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    index = torch.randint(0, len(items), (config.batch_size,), generator=gen)
    return collate([items[i] for i in index.tolist()], pad_id)


def sft(model: nn.Module, train: list[tuple[list[int], list[int]]],
        evaluation: list[tuple[list[int], list[int]]], config: SFTConfig, pad_id: int,
        progress: bool = True, choice: RotationChoice | None = None) -> SFTResult:
    """Fine-tune ``model`` (full precision, in place) on tokenized ``train`` examples under
    ``config``; the answer loss on ``evaluation`` is measured before and after. ``choice``
    fixes the rotations instead of choosing them. Returns the record; the model ends
    frozen (codes, not latent weights) and in evaluation mode."""
    if not train:
        raise ConfigError("sft needs training examples")
    start = time.perf_counter()
    rotations = None
    if config.activations is not None:
        rows = selection_rows(train, config.selection_samples)
        rotations = prepare_activation_quant_(model, config.activations, rows, choice)
    mode = WEIGHT_MODES.get(config.weights)()
    mode.prepare(model, config)
    result = SFTResult(rotations)
    if evaluation:
        result.eval_before = answer_loss_of(model, evaluation, pad_id)
    stepper = mode.stepper(model, config)
    device = next(model.parameters()).device
    model.train()
    bar = tqdm(range(config.steps), desc=f"sft ({config.weights})", disable=not progress)
    for step in bar:
        batch = _batch(train, config, step, pad_id)
        stepper.zero_grad()
        logits = model(input_ids=batch.input_ids.to(device),
                       attention_mask=batch.attention_mask.to(device)).logits
        loss = answer_loss(logits, batch.labels.to(device))
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss is {loss.item()} at step {step}: lower the "
                                "learning rate")
        loss.backward()
        stepper.step(lr_factor(config, step))
        result.losses.append(loss.item())
        bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
    mode.finish(model)
    model.eval()
    if evaluation:
        result.eval_after = answer_loss_of(model, evaluation, pad_id)
    result.seconds = time.perf_counter() - start
    log.info("sft (%s): answer loss %.4f -> %.4f in %.1f min", config.weights,
             result.eval_before or float("nan"), result.eval_after or float("nan"),
             result.seconds / 60)
    return result


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 between two texts: longest common subsequence of their lowercased words
    (no stemming)."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)
