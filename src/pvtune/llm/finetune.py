"""Global fine-tuning of a compressed causal LM through its discrete weights.

Loss: token-level ``KL(teacher || student)`` against the uncompressed model on calibration
text. Each step: forward/backward over ``grad_accum`` micro-batches, then a
:class:`PVOptimizer` step (continuous P step by Adam, discrete V step by the chosen strategy).
Continuous parameters stay at their stored precision (float16) throughout, so the model that
is evaluated is the model that is saved.

Evaluation at step 0 and every ``eval_every`` steps keeps the best model, the starting one
included: a fine-tune that makes the model worse never replaces it unannounced. A resume
checkpoint every ``checkpoint_every`` steps makes a killed run continue to exactly the same
result; the resume state records everything the trajectory depends on (settings, source and
teacher, calibration and evaluation tokens, BOS choice) and a run that differs is refused.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pvtune.distributed import DistributedContext, full_tensor
from pvtune.errors import ConfigError, TrainingError
from pvtune.llm.bos import BosChoice, model_logits
from pvtune.llm.data_parallel import PLACEMENTS, StepExchange
from pvtune.llm.evaluate import perplexity
from pvtune.llm.resume import RESUME_META, load_resume_state, save_resume_state
from pvtune.llm.sharding import full_parameters, shard_model
from pvtune.llm.teacher_logits import TeacherLogits
from pvtune.nn.quantize import decoder_layers
from pvtune.optim.precision import DENSE_STORAGE
from pvtune.optim.pv import PVOptimizer, continuous_parameters
from pvtune.optim.state_io import optimizer_to_tensors
from pvtune.optim.strategies import VStepConfig
from pvtune.reprs.base import check_int, check_range

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of global fine-tuning.

    ``steps`` optimizer steps, each over ``grad_accum`` micro-batches of ``batch_size``
    sequences drawn (seeded by step) from the calibration pool; ``lr`` with ``betas`` for
    the continuous parameters (Adam moves every block scale by about ``lr`` per step, however
    noisy its gradient: the default 1e-4 beat 3e-5 over 200 steps on the Q2_0 file, 87.21
    against 90.86 in ``benchmarks/results/finetune_sweep.md``) under a
    ``schedule`` (``constant``, ``cosine`` or ``linear``
    decay) with ``warmup_steps``; ``vstep`` for the codes, whose step size follows the same
    schedule; ``eval_every`` (0: at the start and the end only) with keep-best;
    ``checkpoint_every`` (0: never) for resuming; ``dense_storage``: the precision of the
    uncompressed parameters (``float16`` keeps them float16-exact, as compression stored
    them); ``vstep_placement``: where a data-parallel run takes the V step (``replicated``:
    every rank steps every weight; ``owner``, the default, measured faster: each weight on one
    rank, which sends the changed codes; see :mod:`pvtune.llm.data_parallel`); ``shard``: a
    data-parallel run shards the continuous parameters and their Adam state with FSDP2
    (:mod:`pvtune.llm.sharding`) instead of replicating them. One process ignores both.
    ``time_budget`` (seconds, None: none): stop before a step (and the evaluation that ends
    the run) would pass it; ``steps`` is then an upper bound, the best model evaluated is
    kept as always, and ``schedule`` runs over the budget's time (the share spent when a
    step starts), so ``linear`` reaches zero as the time runs out.
    """

    steps: int = 50
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: str = "constant"
    warmup_steps: int = 0
    train_dense: bool = True
    vstep: VStepConfig = field(default_factory=VStepConfig)
    eval_every: int = 0
    checkpoint_every: int = 0
    seed: int = 0
    dense_storage: str = "float16"
    vstep_placement: str = "owner"
    shard: bool = False
    time_budget: float | None = None

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
        if self.time_budget is not None:
            check_range(self, "time_budget", self.time_budget, 1e-3, None)
        if self.dense_storage not in DENSE_STORAGE:
            raise ConfigError(f"FinetuneConfig.dense_storage must be one of {DENSE_STORAGE}, "
                              f"got {self.dense_storage!r}")
        if self.vstep_placement not in PLACEMENTS:
            raise ConfigError(f"FinetuneConfig.vstep_placement must be one of {PLACEMENTS}, "
                              f"got {self.vstep_placement!r}")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ConfigError(f"FinetuneConfig.schedule must be constant, cosine or linear, "
                             f"got {self.schedule!r}")


def lr_factor(config: FinetuneConfig, step: int, progress: float | None = None) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based): linear warm-up over
    ``config.warmup_steps``, then ``config.schedule`` over the rest of ``config.steps`` (any
    config with those three fields, such as :class:`pvtune.llm.sft.SFTConfig`).

    ``progress`` (0 to 1; None: from the step count) replaces the share of the run done:
    under a time budget the run's length is time, not steps, and :func:`finetune` passes
    the share of the budget spent."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if progress is None:
        span = max(1, config.steps - config.warmup_steps)
        progress = (step - config.warmup_steps) / span
    progress = min(1.0, max(0.0, progress))
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
    """History of a fine-tuning run: losses and code changes per step, evaluations as
    ``(step, perplexity)`` (step 0 is the starting model), the best of them, and time (the
    communication of a distributed run, gradients reduced and codes sent, apart from
    forward+backward)."""

    losses: list[float] = field(default_factory=list)
    fraction_changed: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    best_perplexity: float | None = None
    best_step: int | None = None
    seconds_forward_backward: float = 0.0
    seconds_discrete: float = 0.0
    seconds_continuous: float = 0.0
    seconds_allreduce: float = 0.0
    code_bytes_sent: int = 0  # by this rank, V step on owner ranks only
    stopped_by_time: bool = False  # the time budget ended the run before ``steps``
    tokens_per_step: int = 0  # training tokens one step sees (all ranks together)

    @property
    def start_perplexity(self) -> float | None:
        """Perplexity of the model before fine-tuning (None without evaluation)."""
        return next((p for s, p in self.evals if s == 0), None)


def tensor_digest(t: Tensor | None) -> str | None:
    """SHA-256 of a tensor's dtype, shape and bytes (None for None)."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.numpy().tobytes())
    return digest.hexdigest()


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
    bos: BosChoice | None = None,
    identity: dict[str, Any] | None = None,
    dist: DistributedContext | None = None,
) -> FinetuneResult:
    """Fine-tune ``student`` (with QuantizedLinear layers) in place; see the module docstring.

    ``save_best(model, step)`` is called when evaluation finds a new best (step 0: the
    starting model); ``checkpoint_dir`` holds the resume state (a run restarted with the same
    arguments continues from it); ``stop_at`` ends this call after that many steps (resume
    later from ``checkpoint_dir``); ``bos`` is applied to every sequence; ``identity``
    (JSON values, e.g. digests of the source checkpoint and the teacher) joins what a resumed
    run must match. ``dist`` runs data-parallel (:mod:`pvtune.distributed`): each rank takes
    its shard of every global micro-batch, gradients are averaged once per step, every rank
    takes the same P and V steps; rank 0 alone shows progress, saves the best model and the
    resume state (which any number of processes can resume). Raises :class:`TrainingError`
    when the loss becomes non-finite (the best model so far has been saved by then).
    """
    began = time.perf_counter()
    torch.manual_seed(config.seed)
    dist = dist or DistributedContext()
    if not dist.is_main:
        progress, save_best = False, None
    sharded = config.shard and dist.active
    if sharded:
        shard_model(student, dist)
        save_best = _saving_whole(save_best)  # every rank gathers, rank 0 writes
    params = continuous_parameters(student)
    if not config.train_dense:
        from pvtune.nn.quantize import quantized_layers

        keep = {id(p) for m in quantized_layers(student).values() for p in m.qweight.parameters()}
        for p in params:
            p.requires_grad_(id(p) in keep)
        params = [p for p in params if id(p) in keep]
    base = torch.optim.Adam(params, lr=config.lr, betas=config.betas)
    exchange = StepExchange(dist, config.vstep_placement, decoder_layers(student),
                            continuous_reduced=sharded)
    opt = PVOptimizer(student, base, config.vstep, dense_storage=config.dense_storage,
                      owned=exchange.owned(),
                      discrete_context=(lambda: full_parameters(student)) if sharded
                      else nullcontext)
    run = {**(identity or {}), "calibration_tokens": tensor_digest(ids),
           "evaluation_tokens": tensor_digest(eval_windows),
           "bos": bos.to_dict() if bos else None}
    result = FinetuneResult()
    start = 0
    if checkpoint_dir is not None and (checkpoint_dir / RESUME_META).is_file():
        start = load_resume_state(checkpoint_dir, student, base, opt, result, config, run)
        log.info("resumed from %s at step %d", checkpoint_dir, start)
    elif eval_windows is not None:
        _evaluate(student, eval_windows, 0, result, save_best, bos, progress, dist)
    result.tokens_per_step = config.batch_size * config.grad_accum * ids.shape[1]
    eval_seconds = time.perf_counter() - began  # what the closing evaluation will take
    train_began, trained = time.perf_counter(), 0
    student.train()
    # under a time budget the clock, not the step count, ends the run: no step total or ETA
    steps = range(start, config.steps)  # an iterator has no length for tqdm to take as total
    bar = tqdm(iter(steps) if config.time_budget is not None else steps,
               desc=f"finetune ({config.vstep.strategy})", disable=not progress, unit="step",
               initial=start, total=None if config.time_budget is not None else config.steps)
    evaluated_at = None
    for step in bar:
        # scales the continuous and the code step alike
        factor = lr_factor(config, step, _time_progress(config, began, dist))
        t0 = time.perf_counter()
        total = 0.0
        for micro in range(config.grad_accum):
            index = dist.shard(batch_indices(config, step, micro, ids.shape[0]))
            target = teacher_logits(index)
            loss = kl_loss(model_logits(student, ids[index], bos), target) / config.grad_accum
            loss.backward()
            total += float(loss.detach())
        reduce_s = 0.0
        if dist.active:
            t_reduce = time.perf_counter()
            exchange.reduce_gradients(params)
            total = dist.mean(total)
            reduce_s = time.perf_counter() - t_reduce
            result.seconds_allreduce += reduce_s
        done = step + 1
        if not math.isfinite(total):
            bar.close()
            best = "" if result.best_step is None else \
                f"; the best model so far (step {result.best_step}) was saved"
            raise TrainingError(
                f"the KL loss became {total} at step {done}: the fine-tuning diverged{best}. "
                "Lower the learning rates (FinetuneConfig.lr, or the code step VStepConfig.lr)"
            )
        t1 = time.perf_counter()
        stats = exchange.step(opt, factor)
        result.code_bytes_sent = exchange.bytes_sent
        if dist.active:  # the codes an owner sent count as communication
            result.seconds_allreduce += (time.perf_counter() - t1 - stats.seconds_continuous
                                         - stats.seconds_discrete)
        opt.zero_grad()
        result.seconds_forward_backward += t1 - t0 - reduce_s
        result.seconds_continuous += stats.seconds_continuous
        result.seconds_discrete += stats.seconds_discrete
        result.losses.append(total)
        result.fraction_changed.append(stats.fraction_changed)
        left = {} if config.time_budget is None else {
            "left": f"{max(0.0, config.time_budget - (time.perf_counter() - began)) / 60:.1f}m"}
        bar.set_postfix(kl=f"{total:.4f}", changed=f"{stats.fraction_changed:.2e}", **left)
        log.debug("step %d: KL %.5f, codes changed %.3e", done, total, stats.fraction_changed)
        trained += 1
        if eval_windows is not None and config.eval_every and done % config.eval_every == 0 \
                and done < config.steps:
            t_eval = time.perf_counter()
            _evaluate(student, eval_windows, done, result, save_best, bos, progress, dist)
            evaluated_at = done
            eval_seconds = time.perf_counter() - t_eval
            train_began += eval_seconds  # the mean step time counts training alone
        if checkpoint_dir is not None and config.checkpoint_every and \
                done % config.checkpoint_every == 0 and done < config.steps:
            tensors, layout, adam_meta = _resume_tensors(student, base, opt, exchange, dist)
            if dist.is_main:
                save_resume_state(checkpoint_dir, tensors, layout, adam_meta, result, done, config,
                             run)
            dist.barrier()
        if stop_at is not None and done >= stop_at:
            break
        if config.time_budget is not None and done < config.steps and _out_of_time(
                config.time_budget, began, (time.perf_counter() - train_began) / trained,
                eval_seconds if eval_windows is not None else 0.0, dist):
            result.stopped_by_time = True
            log.info("time budget of %.0f s: stopping after step %d", config.time_budget, done)
            break
    bar.close()
    last = len(result.losses)
    finished = last == config.steps or result.stopped_by_time
    if eval_windows is not None and finished and evaluated_at != last and \
            not any(s == last for s, _ in result.evals):
        _evaluate(student, eval_windows, last, result, save_best, bos, progress, dist)
    student.eval()
    return result


def _time_progress(config: FinetuneConfig, began: float,
                   dist: DistributedContext) -> float | None:
    """The share of the time budget spent (None without a budget or a schedule to follow),
    the same on every rank (their clocks differ; their code steps must not)."""
    if config.time_budget is None or config.schedule == "constant":
        return None
    spent = (time.perf_counter() - began) / config.time_budget
    return dist.mean(spent)


def _out_of_time(budget: float, began: float, step_seconds: float, eval_seconds: float,
                 dist: DistributedContext) -> bool:
    """Whether one more step and the closing evaluation would pass the budget (every rank
    stops when any rank would: their clocks differ)."""
    late = time.perf_counter() - began + step_seconds + eval_seconds > budget
    return dist.mean(float(late)) > 0 if dist.active else late


def _saving_whole(save_best):
    """``save_best`` for a sharded model: every rank gathers the whole parameters, rank 0
    (which alone holds a ``save_best``) writes them."""

    def save(model, step) -> None:
        with full_parameters(model):
            if save_best is not None:
                save_best(model, step)

    return save


def _resume_tensors(student, base, opt: PVOptimizer, exchange: StepExchange,
                    dist: DistributedContext):
    """The resume state's tensors, layout and Adam record, whole, on rank 0 (``(None, None,
    None)`` elsewhere). A collective: every rank calls it."""
    from pvtune.checkpoint.format import pack_state

    opt_tensors = exchange.v_state_tensors(opt)
    adam_tensors, adam_meta = optimizer_to_tensors(base, "adam")
    adam_tensors = {k: full_tensor(v) for k, v in adam_tensors.items()}
    with full_parameters(student):
        if not dist.is_main:
            return None, None, None
        model_tensors, layout = pack_state(student)
    tensors = {**{f"model.{k}": v for k, v in model_tensors.items()}, **adam_tensors,
               **opt_tensors}
    return tensors, layout, adam_meta


def _evaluate(student, windows, step, result: FinetuneResult, save_best, bos,
              progress: bool, dist: DistributedContext) -> None:
    # every rank evaluates its share of the windows and gets the same perplexity
    ppl = perplexity(student, windows, progress=progress, bos=bos, dist=dist).perplexity
    student.train()
    result.evals.append((step, ppl))
    label = "starting model" if step == 0 else f"step {step}"
    if not math.isfinite(ppl):
        log.warning("%s: evaluation perplexity is %s (diverged); it cannot be the best", label,
                    ppl)
        return
    log.info("%s: evaluation perplexity %.3f", label, ppl)
    if result.best_perplexity is None or ppl < result.best_perplexity:
        result.best_perplexity, result.best_step = ppl, step
        if save_best is not None:
            save_best(student, step)
