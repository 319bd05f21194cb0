"""``compress_checkpoint``: compress a model into a pvtune checkpoint folder, the whole job
``pvtune compress`` runs, for a notebook user too::

    job = CompressJob(request=CompressRequest(budget=BudgetConfig.for_types(
        target_bytes=60 * 2**20)), preset="demo", chat_data=16)
    outcome = compress_checkpoint(None, Path("demo-60mib"), job)   # None: the default model
    outcome.results["compressed"]["perplexity"], outcome.size_bytes

The rules it owns: the model is a folder, a GGUF file (converted once) or a hub id, and the
checkpoint records where it came from (:func:`~pvtune.llm.sources.model_source`); the
compression config follows :func:`~pvtune.llm.compress_request.compress_config`; the output
is refused before any work when writing there would lose work and is locked while the job
runs; the layers are checked to fit the representation before any long work; BOS is decided
as llama.cpp does and recorded; a size budget counts the GGUF file's metadata; the checkpoint
is saved (or rescued) before anything optional.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvtune.distributed import DistributedContext
from pvtune.errors import ConfigError, ModelError
from pvtune.llm.bos import BosChoice, decide_bos, with_bos
from pvtune.llm.chat_data import add_chat_data
from pvtune.llm.checkpoint import config_record, save_or_rescue, size_on_disk
from pvtune.llm.compress_request import CompressRequest, compress_config, default_method
from pvtune.llm.data import (
    EvalConfig,
    calibration_batch,
    eval_windows,
    load_texts,
    tokenize_stream,
    warn_if_overlapping,
)
from pvtune.llm.evaluate import evaluation_record
from pvtune.llm.model import count_params, find_blocks, load_causal_lm, model_fingerprint
from pvtune.llm.outputs import check_space, prepare_output
from pvtune.llm.pipeline import CompressConfig, CompressReport, check_layers_fit, compress_model
from pvtune.llm.recipes import PRESETS
from pvtune.llm.sources import REFERENCE_NOTE, gguf_metadata_beside, model_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressJob:
    """What one compression asks for.

    ``request``: the compression choices (method, format, budget, rotation, ...);
    ``preset``: the effort preset it falls back on (a name in
    :data:`~pvtune.llm.recipes.PRESETS`); ``calib_text``: a .txt or .jsonl file (None: the
    offline Wikipedia calibration split); ``chat_data``: that many sequences of conversations
    the model writes itself added to the calibration (cached); ``evaluate``: perplexity of
    the model before and after on ``eval_text`` (None: the offline evaluation split) by
    ``evaluation`` (None: the preset's windows); ``bos``: force BOS on or off (None: decided
    per model); ``overwrite``: write into a non-empty output.
    """

    request: CompressRequest = field(default_factory=CompressRequest)
    preset: str = "standard"
    calib_text: str | Path | None = None
    chat_data: int = 0
    evaluate: bool = True
    evaluation: EvalConfig | None = None
    eval_text: str | Path | None = None
    bos: bool | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of "
                              f"{', '.join(sorted(PRESETS))}")
        if self.chat_data < 0:
            raise ConfigError(f"chat_data must be >= 0, got {self.chat_data}")

    def config(self) -> CompressConfig:
        """The compression config this job runs (the preset's rules applied)."""
        return compress_config(self.request, PRESETS[self.preset])


@dataclass
class CompressOutcome:
    """What :func:`compress_checkpoint` made: the compressed ``model`` and its
    ``tokenizer``, the ``output`` folder, its record ``meta`` (``meta["bits"]``: bits per
    parameter as stored), its ``size_bytes`` on disk, the ``report`` of the compression,
    the ``config`` it ran, the ``bos`` choice and the perplexity ``results`` ("reference",
    "compressed"; empty without evaluation)."""

    model: nn.Module
    tokenizer: Any
    output: Path
    meta: dict
    size_bytes: int
    report: CompressReport
    config: CompressConfig
    bos: BosChoice
    results: dict = field(default_factory=dict)


def default_output(request: CompressRequest) -> Path:
    """Where a compression goes unless told: ``compressed-METHOD-WHAT`` in the working
    folder, WHAT the budget, the codebook layout, the block type or the bits."""
    method = default_method(request)
    budget = request.budget
    if budget is not None:
        kind = (f"{budget.target_bytes / 2**20:.0f}mib" if budget.target_bytes is not None
                else f"{budget.target_bits:g}bpp")
    elif method == "aqlm":
        kind = request.codebooks
    else:
        kind = request.format or f"{request.bits}bit"
    return Path(f"compressed-{method}-{kind}")


def gguf_metadata_size(model: nn.Module, tokenizer, source_dir: Path | None) -> int:
    """What a GGUF export of ``model`` holds besides tensors (0, with a note, where the
    architecture has no GGUF export: a budget then counts tensors and norms only)."""
    from pvtune.export.gguf import gguf_metadata_bytes

    try:
        return gguf_metadata_bytes(model, tokenizer, gguf_metadata_beside(source_dir))
    except ModelError as err:
        log.info("the size budget counts tensors and norms only (%s)", err)
        return 0


def compress_checkpoint(model: str | Path | None, output: Path | None, job: CompressJob,
                        dist: DistributedContext | None = None) -> CompressOutcome | None:
    """Compress ``model`` (None: the offline default model; a folder, a ``.gguf`` file or a
    hub id) by ``job`` and save it as a pvtune checkpoint in ``output`` (None:
    :func:`default_output`). ``dist`` compresses data-parallel (every rank holds the
    compressed model; rank 0 evaluates, writes and returns the outcome, the others return
    None). Raises :class:`~pvtune.errors.ConfigError` for choices that do not go together,
    :class:`~pvtune.errors.OutputError` for an output that would lose work or has no room,
    :class:`~pvtune.errors.ModelError` for a model that cannot be loaded or compressed."""
    dist = dist or DistributedContext()
    torch.manual_seed(job.request.seed)
    config = job.config()
    preset = PRESETS[job.preset]
    source = model_source(model)
    output = Path(output) if output is not None else default_output(job.request)
    lock = prepare_output(output, job.overwrite, {"source model folder": source.path}) \
        if dist.is_main else None  # held until the checkpoint is saved
    try:
        dist.barrier()
        t0 = time.perf_counter()
        net, tokenizer = load_causal_lm(source.loadable)
        params = count_params(net)
        if dist.is_main:
            check_space(output, 2 * params)  # float16 everything: more than any compressed form
        check_layers_fit(net, find_blocks(net), config)  # before any long work
        bos = decide_bos(source.path, tokenizer, net.config, job.bos)
        log.info("loaded %s (%.1fM parameters) in %.1f s; BOS: %s (%s)", source.record,
                 params / 1e6, time.perf_counter() - t0, "yes" if bos.add else "no", bos.reason)
        if source.is_default:
            log.info("note: %s", REFERENCE_NOTE)
        fingerprint = model_fingerprint(source.loadable)
        calib_ids = calibration_batch(
            tokenize_stream(tokenizer, load_texts(job.calib_text, "calibration")),
            config.calibration)
        chat_record = None
        if job.chat_data:
            calib_ids, chat_record = add_chat_data(net, tokenizer, calib_ids, job.chat_data,
                                                   fingerprint, job.request.seed)
        results: dict = {}
        windows = None
        if job.evaluate and dist.is_main:
            windows = eval_windows(tokenize_stream(tokenizer,
                                                   load_texts(job.eval_text, "evaluation")),
                                   job.evaluation or preset.evaluation)
            warn_if_overlapping(calib_ids, windows)
            results["reference"] = evaluation_record(net, windows,
                                                     "reference (uncompressed) model", bos)
        what = "chosen per tensor within the budget" if config.budget else config.representation
        log.info("compressing: method=%s representation=%s, %d x %d calibration tokens",
                 config.method, what, calib_ids.shape[0], calib_ids.shape[1])
        metadata = gguf_metadata_size(net, tokenizer, source.path) if config.budget else 0
        report = compress_model(net, with_bos(calib_ids, bos), config, dist=dist,
                                metadata_bytes=metadata)
        if not dist.is_main:  # every rank holds the compressed model; rank 0 writes
            return None
        if windows is not None:
            results["compressed"] = evaluation_record(net, windows, "compressed model", bos)
        meta: dict[str, Any] = {
            "source_model": source.record, "source_fingerprint": fingerprint,
            "bos": bos.to_dict(), "compress_config": config_record(config),
            "evaluation": results, "compress_seconds": report.seconds,
            "layers": [dataclasses.asdict(r) for r in report.layers],
            "block_finetune": report.block_losses}
        if chat_record is not None:
            meta["chat_data"] = chat_record
        if report.plan is not None:
            meta["budget_plan"] = report.plan.to_dict()
        if report.rotation is not None:
            meta["rotation"] = report.rotation.to_dict()
        if report.activations is not None:
            meta["activation_rotations"] = report.activations.to_dict()
        if source.is_default:
            meta["reference_note"] = REFERENCE_NOTE
        saved = save_or_rescue(net, tokenizer, output, meta)
        return CompressOutcome(net, tokenizer, output, saved, size_on_disk(output), report,
                               config, bos, results)
    finally:
        if lock is not None:
            lock.release()


__all__ = ["CompressJob", "CompressOutcome", "compress_checkpoint", "default_output",
           "gguf_metadata_size"]
