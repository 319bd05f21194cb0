"""Global fine-tuning of a compressed causal LM through its discrete weights.

Loss: token-level ``KL(teacher || student)`` against the uncompressed model on calibration
text. Each step: forward/backward over ``grad_accum`` micro-batches, then a
:class:`PVOptimizer` step (continuous P step by Adam, discrete V step by the chosen strategy).
Evaluation every ``eval_every`` steps keeps the best model; a resume checkpoint every
``checkpoint_every`` steps makes a killed run continue to exactly the same result.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from pvtune.errors import ConfigError
from pvtune.llm.evaluate import perplexity
from pvtune.optim.pv import PVOptimizer, continuous_parameters
from pvtune.optim.state_io import optimizer_from_tensors, optimizer_to_tensors
from pvtune.optim.strategies import VStepConfig
from pvtune.reprs.base import check_int, check_range

log = logging.getLogger(__name__)

RESUME_TENSORS = "resume_state.safetensors"
RESUME_META = "resume_state.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of global fine-tuning.

    ``steps`` optimizer steps, each over ``grad_accum`` micro-batches of ``batch_size``
    sequences drawn (seeded by step) from the calibration pool; ``lr`` with ``betas`` for
    the continuous parameters under a ``schedule`` (``constant``, ``cosine`` or ``linear``
    decay) with ``warmup_steps``; ``vstep`` for the codes, whose step size follows the same
    schedule; ``eval_every`` (0: only at the end) with keep-best; ``checkpoint_every``
    (0: never) for resuming.
    """

    steps: int = 50
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "constant"
    warmup_steps: int = 0
    train_dense: bool = True
    vstep: VStepConfig = field(default_factory=VStepConfig)
    eval_every: int = 0
    checkpoint_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("steps", "batch_size", "grad_accum", "warmup_steps", "eval_every",
                  "checkpoint_every", "seed"):
            check_int(self, f, getattr(self, f))
        check_range(self, "steps", self.steps, 0, None)
        check_range(self, "batch_size", self.batch_size, 1, None)
        check_range(self, "grad_accum", self.grad_accum, 1, None)
        check_range(self, "lr", self.lr, 0.0, None)
        check_range(self, "warmup_steps", self.warmup_steps, 0, None)
        check_range(self, "eval_every", self.eval_every, 0, None)
        check_range(self, "checkpoint_every", self.checkpoint_every, 0, None)
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ConfigError(f"FinetuneConfig.schedule must be constant, cosine or linear, "
                             f"got {self.schedule!r}")


def lr_factor(config: FinetuneConfig, step: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if config.schedule == "linear":
        return 1.0 - progress
    return 1.0


def kl_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Token-level ``KL(teacher || student)`` averaged over tokens."""
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def batch_indices(config: FinetuneConfig, step: int, micro: int, pool: int) -> Tensor:
    """Sequences of micro-batch ``micro`` at ``step``: a function of (seed, step) only."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    perm = torch.randperm(pool, generator=gen)
    need = config.batch_size * config.grad_accum
    perm = perm.repeat(math.ceil(need / pool))[:need]
    return perm[micro * config.batch_size:(micro + 1) * config.batch_size]


@dataclass
class FinetuneResult:
    """History of a fine-tuning run."""

    losses: list[float] = field(default_factory=list)
    fraction_changed: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    best_perplexity: float | None = None
    best_step: int | None = None
    seconds_forward_backward: float = 0.0
    seconds_discrete: float = 0.0
    seconds_continuous: float = 0.0


class TeacherLogits:
    """The teacher's logits per calibration sequence: on the fly, or cached to disk in
    float16 (one safetensors file per sequence, written on first use)."""

    def __init__(self, teacher: nn.Module, ids: Tensor, cache_dir: Path | None = None):
        self.teacher, self.ids, self.cache_dir = teacher, ids, cache_dir
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)

    @torch.no_grad()
    def __call__(self, index: Tensor) -> Tensor:
        if self.cache_dir is None:
            return self.teacher(input_ids=self.ids[index], use_cache=False).logits
        rows = []
        for i in index.tolist():
            path = self.cache_dir / f"seq{i:06d}.safetensors"
            if not path.is_file():
                logits = self.teacher(input_ids=self.ids[i:i + 1], use_cache=False).logits
                save_file({"logits": logits[0].to(torch.float16).contiguous()}, str(path))
            rows.append(load_file(str(path))["logits"].float())
        return torch.stack(rows)


def finetune(
    student: nn.Module,
    teacher_logits: TeacherLogits,
    ids: Tensor,
    config: FinetuneConfig,
    eval_windows: Tensor | None = None,
    checkpoint_dir: Path | None = None,
    save_best=None,
    progress: bool = True,
    stop_at: int | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` (with QuantizedLinear layers) in place; see the module docstring.

    ``save_best(model)`` is called when evaluation finds a new best; ``checkpoint_dir``
    holds the resume state (a run restarted with the same arguments continues from it);
    ``stop_at`` ends this call after that many steps (resume later from ``checkpoint_dir``).
    """
    torch.manual_seed(config.seed)
    params = continuous_parameters(student)
    if not config.train_dense:
        from pvtune.nn.quantize import quantized_layers

        keep = {id(p) for m in quantized_layers(student).values() for p in m.qweight.parameters()}
        for p in params:
            p.requires_grad_(id(p) in keep)
        params = [p for p in params if id(p) in keep]
    base = torch.optim.Adam(params, lr=config.lr, betas=config.betas)
    opt = PVOptimizer(student, base, config.vstep)
    result = FinetuneResult()
    start = 0
    if checkpoint_dir is not None and (checkpoint_dir / RESUME_META).is_file():
        start = _load_resume(checkpoint_dir, student, base, opt, result, config)
        log.info("resumed from %s at step %d", checkpoint_dir, start)
    student.train()
    bar = tqdm(range(start, config.steps), desc=f"finetune ({config.vstep.strategy})",
               disable=not progress, unit="step", initial=start, total=config.steps)
    for step in bar:
        factor = lr_factor(config, step)  # scales the continuous and the code step alike
        t0 = time.perf_counter()
        total = 0.0
        for micro in range(config.grad_accum):
            index = batch_indices(config, step, micro, ids.shape[0])
            target = teacher_logits(index)
            logits = student(input_ids=ids[index], use_cache=False).logits
            loss = kl_loss(logits, target) / config.grad_accum
            loss.backward()
            total += float(loss.detach())
        t1 = time.perf_counter()
        stats = opt.step(lr_scale=factor)
        opt.zero_grad()
        t2, t3 = t1 + stats.seconds_continuous, time.perf_counter()
        result.seconds_forward_backward += t1 - t0
        result.seconds_continuous += t2 - t1
        result.seconds_discrete += t3 - t2
        result.losses.append(total)
        result.fraction_changed.append(stats.fraction_changed)
        bar.set_postfix(kl=f"{total:.4f}", changed=f"{stats.fraction_changed:.2e}")
        done = step + 1
        log.info("step %d: KL %.5f, codes changed %.3e", done, total, stats.fraction_changed)
        if eval_windows is not None and ((config.eval_every and done % config.eval_every == 0)
                                         or done == config.steps):
            _evaluate(student, eval_windows, done, result, save_best)
        if checkpoint_dir is not None and config.checkpoint_every and \
                done % config.checkpoint_every == 0 and done < config.steps:
            _save_resume(checkpoint_dir, student, base, opt, result, done, config)
        if stop_at is not None and done >= stop_at:
            break
    student.eval()
    return result


def _evaluate(student, windows, step, result: FinetuneResult, save_best) -> None:
    ppl = perplexity(student, windows, progress=False).perplexity
    student.train()
    result.evals.append((step, ppl))
    log.info("step %d: evaluation perplexity %.3f", step, ppl)
    if result.best_perplexity is None or ppl < result.best_perplexity:
        result.best_perplexity, result.best_step = ppl, step
        if save_best is not None:
            save_best(student)


# settings that do not change the training trajectory: a resumed run may change them
_RESUME_FREE = ("eval_every", "checkpoint_every")


def _trajectory_settings(config: FinetuneConfig) -> dict[str, Any]:
    """The config as JSON values, without the fields a resumed run may change."""
    settings = json.loads(json.dumps(asdict(config)))
    return {k: v for k, v in settings.items() if k not in _RESUME_FREE}


def _save_resume(directory: Path, student, base, opt: PVOptimizer, result, step: int,
                 config: FinetuneConfig) -> None:
    from pvtune.checkpoint.format import pack_state

    directory.mkdir(parents=True, exist_ok=True)
    model_tensors, layout = pack_state(student)
    adam_tensors, adam_meta = optimizer_to_tensors(base, "adam")
    tensors = {**{f"model.{k}": v for k, v in model_tensors.items()}, **adam_tensors,
               **opt.state_tensors()}
    save_file(tensors, str(directory / RESUME_TENSORS))
    meta = {"step": step, "layout": layout, "adam": adam_meta, "result": asdict(result),
            "settings": _trajectory_settings(config)}
    tmp = directory / (RESUME_META + ".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(directory / RESUME_META)  # the JSON names a complete tensor file


def _load_resume(directory: Path, student, base, opt: PVOptimizer, result,
                 config: FinetuneConfig) -> int:
    from pvtune.checkpoint.format import unpack_state

    meta: dict[str, Any] = json.loads((directory / RESUME_META).read_text())
    saved, now = meta.get("settings"), _trajectory_settings(config)
    if saved is not None and saved != now:
        changed = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
                            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k))
        raise ValueError(
            f"{directory} holds the resume state of a run with other settings ({changed}); "
            "run with the same settings to continue it, or delete that folder (or choose "
            "another --output) to start afresh"
        )
    tensors = load_file(str(directory / RESUME_TENSORS))
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    student.load_state_dict(unpack_state(model_state, meta["layout"]), strict=True)
    optimizer_from_tensors(base, "adam", tensors, meta["adam"])
    opt.load_state_tensors(tensors)
    for key, value in meta["result"].items():
        setattr(result, key, value if not isinstance(value, list)
                else [tuple(v) if isinstance(v, list) else v for v in value])
    return int(meta["step"])
