"""``finetune_checkpoint``: fine-tune a saved compressed checkpoint into a new folder, the
whole job ``pvtune finetune`` runs, for a notebook user too::

    job = finetune_job("demo")           # or FinetuneJob(config=finetune_config(steps=20), ...)
    outcome = finetune_checkpoint(Path("demo-60mib"), Path("demo-60mib-pv"), job)
    outcome.result.best_perplexity, outcome.size_bytes

The rules it owns: the teacher is the model the checkpoint records it was compressed from
unless one is named (:func:`~pvtune.llm.teacher.resolve_teacher`); the checkpoint's BOS
choice and dense storage are kept; the output is refused before any work when writing there
would lose work (:func:`~pvtune.llm.outputs.prepare_output`); a run restarted into the
same output continues from its resume state; under a time budget the steps are an upper
bound and evaluation keeps a schedule (:func:`finetune_config`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvtune.distributed import DistributedContext
from pvtune.errors import ConfigError, ModelError
from pvtune.llm.bos import BosChoice, decide_bos
from pvtune.llm.chat_data import add_chat_data
from pvtune.llm.checkpoint import (
    config_record,
    read_meta,
    save_or_rescue,
    size_on_disk,
    write_meta,
)
from pvtune.llm.data import (
    CalibrationConfig,
    EvalConfig,
    calibration_batch,
    eval_windows,
    load_texts,
    tokenize_stream,
    warn_if_overlapping,
)
from pvtune.llm.finetune import FinetuneConfig, FinetuneResult, finetune
from pvtune.llm.model import (
    count_params,
    is_pvtune_checkpoint,
    load_causal_lm,
    model_fingerprint,
)
from pvtune.llm.outputs import check_space, prepare_output
from pvtune.llm.resume import RESUME_META, clear_resume_state
from pvtune.llm.sharding import full_parameters
from pvtune.llm.teacher import FinetuneRecord, Teacher, resolve_teacher
from pvtune.llm.teacher_logits import TeacherLogits

log = logging.getLogger(__name__)

TIME_BUDGET_MAX_STEPS = 1_000_000  # a time budget without a step count: time alone decides
TIME_BUDGET_EVAL_EVERY = 25
DEFAULT_STEPS = 50


def finetune_config(steps: int | None = None, eval_every: int | None = None,
                    time_budget: float | None = None, **settings: Any) -> FinetuneConfig:
    """A :class:`FinetuneConfig` where ``steps`` and ``eval_every`` default by the time
    budget: without one, 50 steps evaluated at the start and the end; with one, as many
    steps as fit (``steps`` is then an upper bound) evaluated every 25."""
    if steps is None:
        steps = TIME_BUDGET_MAX_STEPS if time_budget else DEFAULT_STEPS
    if eval_every is None:
        eval_every = TIME_BUDGET_EVAL_EVERY if time_budget else 0
    return FinetuneConfig(steps=steps, eval_every=eval_every, time_budget=time_budget,
                          **settings)


@dataclass(frozen=True)
class FinetuneJob:
    """What one fine-tune of a checkpoint asks for.

    ``config``: the training (its ``dense_storage`` is replaced by the checkpoint's);
    ``calibration``: how the training sequences are cut from ``calib_text`` (a .txt or
    .jsonl file; None: the offline Wikipedia calibration split); ``chat_data``: that many
    sequences of conversations the teacher writes itself added (cached); ``evaluation``:
    the keep-best evaluation on ``eval_text`` (None: no evaluation, the last step is kept);
    ``teacher``: a model path or hub id (None: the checkpoint's source); ``bos``: force BOS
    on or off (None: the checkpoint's choice); ``cache_teacher``: keep the teacher's logits
    on disk; ``overwrite``: write into a non-empty output, discarding its resume state
    (resume state is written every ``config.checkpoint_every`` steps).
    """

    config: FinetuneConfig = field(default_factory=FinetuneConfig)
    calibration: CalibrationConfig = field(
        default_factory=lambda: CalibrationConfig(num_sequences=128, sequence_length=256))
    calib_text: str | Path | None = None
    chat_data: int = 0
    evaluation: EvalConfig | None = field(default_factory=lambda: EvalConfig(max_windows=32))
    eval_text: str | Path | None = None
    teacher: str | None = None
    bos: bool | None = None
    cache_teacher: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class FinetunePreset:
    """The defaults of a fine-tune by effort: ``steps`` (None: :func:`finetune_config`'s
    rule), ``time_budget`` in seconds (None: none), the training sequences
    (``calibration``, plus ``chat_data`` sequences of conversations the teacher writes), the
    keep-best ``evaluation`` and the learning-rate ``schedule``."""

    description: str
    steps: int | None
    time_budget: float | None
    calibration: CalibrationConfig
    chat_data: int
    evaluation: EvalConfig
    schedule: str = "constant"


FINETUNE_PRESETS: dict[str, FinetunePreset] = {
    "standard": FinetunePreset(
        "50 steps of 2 x 256 tokens from 128 calibration sequences, evaluated on 32 windows",
        None, None, CalibrationConfig(num_sequences=128, sequence_length=256), 0,
        EvalConfig(max_windows=32)),
    "demo": FinetunePreset(
        "make demo's: 20 steps, 32 sequences of conversations the teacher writes added, "
        "evaluated on 16 windows", 20, None,
        CalibrationConfig(num_sequences=128, sequence_length=256), 32,
        EvalConfig(max_windows=16)),
    "quality": FinetunePreset(
        "one hour: as many steps as fit in 60 minutes, the learning rate and the code step "
        "decaying linearly to zero over the hour, evaluated every 25 steps on 32 windows, "
        "the best kept; 1,024 calibration sequences of 256 tokens (about 500 steps of 2 fit "
        "an hour on 2 CPU cores, so none repeats) and 64 of conversations",
        None, 3600.0, CalibrationConfig(num_sequences=1024, sequence_length=256), 64,
        EvalConfig(max_windows=32), schedule="linear"),
}


def finetune_job(preset: str = "standard", *, steps: int | None = None,
                 time_budget: float | None = None, eval_every: int | None = None,
                 num_seqs: int | None = None, seq_len: int | None = None,
                 chat_data: int | None = None, eval_window: int | None = None,
                 eval_windows: int | None = None, evaluate: bool = True, seed: int = 0,
                 calib_text: str | Path | None = None, eval_text: str | Path | None = None,
                 teacher: str | None = None, bos: bool | None = None,
                 cache_teacher: bool = False, overwrite: bool = False,
                 **settings: Any) -> FinetuneJob:
    """A :class:`FinetuneJob` from the preset ``preset`` (:data:`FINETUNE_PRESETS`), each
    argument given (not None) overriding it; ``settings`` go to :class:`FinetuneConfig`
    (``lr``, ``batch_size``, ``vstep``, ...; a ``schedule`` of None is the preset's);
    ``evaluate=False``: no keep-best evaluation."""
    if preset not in FINETUNE_PRESETS:
        raise ConfigError(f"no fine-tuning preset {preset!r}; known: "
                          f"{', '.join(sorted(FINETUNE_PRESETS))}")
    p = FINETUNE_PRESETS[preset]
    if settings.get("schedule") is None:
        settings["schedule"] = p.schedule
    config = finetune_config(steps=p.steps if steps is None else steps, eval_every=eval_every,
                             time_budget=p.time_budget if time_budget is None else time_budget,
                             seed=seed, **settings)
    calibration = CalibrationConfig(
        num_sequences=p.calibration.num_sequences if num_seqs is None else num_seqs,
        sequence_length=p.calibration.sequence_length if seq_len is None else seq_len,
        seed=seed)
    evaluation = EvalConfig(window=p.evaluation.window if eval_window is None else eval_window,
                            max_windows=(p.evaluation.max_windows if eval_windows is None
                                         else eval_windows),
                            batch_size=p.evaluation.batch_size) if evaluate else None
    return FinetuneJob(config=config, calibration=calibration, calib_text=calib_text,
                       chat_data=p.chat_data if chat_data is None else chat_data,
                       evaluation=evaluation, eval_text=eval_text, teacher=teacher, bos=bos,
                       cache_teacher=cache_teacher, overwrite=overwrite)


@dataclass
class FinetuneOutcome:
    """What :func:`finetune_checkpoint` made: the training ``result``, the ``output``
    folder, its record ``meta`` (bits included), its ``size_bytes`` on disk; None on ranks
    other than 0 of a data-parallel run."""

    result: FinetuneResult
    output: Path
    meta: dict
    size_bytes: int


def default_output(source: Path, strategy: str) -> Path:
    """Where a fine-tune of ``source`` goes unless told: beside it, named by the strategy."""
    return Path(f"{source}-finetuned-{strategy}")


def check_source(source: Path, teacher: str | None) -> tuple[FinetuneRecord, Teacher]:
    """The checked record of the checkpoint ``source`` and the teacher a fine-tune of it
    uses (``teacher``, else its recorded source); a :class:`~pvtune.errors.ModelError` or
    :class:`~pvtune.errors.CheckpointError` naming what is wrong, before any work."""
    if not is_pvtune_checkpoint(source):
        raise ModelError(f"{source} is not a pvtune checkpoint; compress a model first")
    record = FinetuneRecord.of(read_meta(source), source)
    return record, resolve_teacher(source, record, teacher)


def finetune_checkpoint(source: Path, output: Path, job: FinetuneJob,
                        dist: DistributedContext | None = None,
                        progress: bool = True) -> FinetuneOutcome | None:
    """Fine-tune the compressed checkpoint ``source`` by ``job`` and save the best model
    evaluated into ``output`` (a pvtune checkpoint; with ``job.config.checkpoint_every``, its
    ``resume`` folder lets a restarted run continue). ``dist`` runs data-parallel; rank 0
    writes and returns the outcome, the other ranks return None. Raises
    :class:`~pvtune.errors.ModelError` for a source that is no checkpoint or a teacher of
    another vocabulary, :class:`~pvtune.errors.OutputError` for an output that would lose
    work, :class:`~pvtune.errors.TrainingError` when training diverges (the best model so
    far is saved by then)."""
    dist = dist or DistributedContext()
    record_in, teacher_choice = check_source(source, job.teacher)
    resume = output / "resume"
    resuming = (resume / RESUME_META).is_file() and not job.overwrite
    if job.config.shard and not dist.active:
        log.info("sharding splits the continuous parameters across the processes of a "
                 "data-parallel job; with one process it changes nothing")
    student, tokenizer = load_causal_lm(source)
    lock = None  # the output's lock, held by rank 0 until the work is saved
    if dist.is_main:  # rank 0 prepares the output; the others wait for it
        lock = prepare_output(output, job.overwrite or resuming,
                              {"source checkpoint": source,
                               "teacher model folder": teacher_choice.path})
        check_space(output, 4 * count_params(student))  # the checkpoint and resume state
        if job.overwrite and resume.is_dir():
            shutil.rmtree(resume)
    try:
        dist.barrier()
        if teacher_choice.source is None:
            from pvtune.llm.assets import default_model_dir

            teacher_load = default_model_dir()  # verified once, then loaded and fingerprinted
        else:
            teacher_load = teacher_choice.source
        teacher, _ = load_causal_lm(teacher_load)
        teacher.eval()
        teacher.requires_grad_(False)
        if teacher.config.vocab_size != student.config.vocab_size:
            raise ModelError(f"the teacher ({teacher_choice.name}) has a vocabulary of "
                             f"{teacher.config.vocab_size} tokens, the student "
                             f"{student.config.vocab_size}: name the model {source} was "
                             "compressed from as the teacher")
        if job.bos is None and record_in.bos is not None:
            bos = BosChoice.from_dict(record_in.bos)
        else:
            bos = decide_bos(source, tokenizer, student.config, job.bos)
        teacher_print = model_fingerprint(teacher_load)
        ids = calibration_batch(tokenize_stream(tokenizer,
                                                load_texts(job.calib_text, "calibration")),
                                job.calibration)
        chat_record = None
        if job.chat_data:
            ids, chat_record = add_chat_data(teacher, tokenizer, ids, job.chat_data, teacher_print,
                                             job.calibration.seed)
        windows = None
        if job.evaluation is not None:
            windows = eval_windows(tokenize_stream(tokenizer,
                                                   load_texts(job.eval_text, "evaluation")),
                                   job.evaluation)
            warn_if_overlapping(ids, windows)
        config = dataclasses.replace(job.config, dense_storage=record_in.dense_storage)
        logits = TeacherLogits(teacher, ids, output / "teacher_cache" if job.cache_teacher
                               else None, fingerprint=teacher_print, bos=bos)
        record: dict[str, Any] = {"source_checkpoint": str(source.resolve()),
                                  "source_model": record_in.source_model,
                                  "teacher": teacher_choice.name, "bos": bos.to_dict(),
                                  "finetune_config": config_record(config),
                                  "compress_config": {"dense_storage": record_in.dense_storage}}
        if chat_record is not None:
            record["chat_data"] = chat_record
        span = (f"up to {config.steps} steps" if config.time_budget is None else
                f"steps for {config.time_budget:.0f} s (at most {config.steps})")
        log.info("fine-tuning %s (teacher %s, BOS %s): %s of %d x %d tokens, strategy %s",
                 source, record["teacher"], "yes" if bos.add else "no", span,
                 config.batch_size * config.grad_accum, ids.shape[1], config.vstep.strategy)

        def save_best(model, step) -> None:
            save_or_rescue(model, tokenizer, output, {**record, "best_step": step})
            log.info("saved the best model so far (step %d) to %s", step, output)

        dist.barrier()  # every rank has tidied the shared teacher cache before any writes to it
        result = finetune(student, logits, ids, config, windows,
                          checkpoint_dir=resume if config.checkpoint_every else None,
                          save_best=save_best if windows is not None else None, bos=bos,
                          identity={"source": model_fingerprint(source), "teacher": teacher_print},
                          dist=dist, progress=progress)
        if windows is None:
            with full_parameters(student):  # whole on every rank (FSDP); rank 0 writes
                if dist.is_main:
                    save_or_rescue(student, tokenizer, output,
                                   {**record, "best_step": config.steps})
        if not dist.is_main:  # every rank holds the same model; rank 0 writes and reports
            return None
        saved = read_meta(output)
        saved["finetune_result"] = dataclasses.asdict(result)
        write_meta(output, saved)
        if len(result.losses) == config.steps or result.stopped_by_time:
            clear_resume_state(resume)  # finished: a rerun must not continue it
        return FinetuneOutcome(result, output, saved, size_on_disk(output))
    finally:
        if lock is not None:
            lock.release()


__all__ = ["FinetuneJob", "FinetuneOutcome", "check_source", "default_output",
           "finetune_checkpoint", "finetune_config"]
