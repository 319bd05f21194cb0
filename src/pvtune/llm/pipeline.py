"""Block-by-block compression of a causal LM with calibration activations.

Each block sees the inputs produced by the already-compressed blocks before it. For every
block: one pass of the original block over the calibration activations collects each
linear's ``E[x x^T]`` and the block's reference outputs; the linears are compressed by the
chosen initialiser; optionally the block's continuous parameters are fine-tuned to match the
reference outputs; a last pass produces the inputs of the next block. Activations live in
one ``[N, L, hidden]`` buffer (plus the reference outputs): memory stays bounded and no
per-layer copy of the model is made.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pvtune.distributed import DistributedContext, assign_layers
from pvtune.errors import ConfigError
from pvtune.init.registry import get_init
from pvtune.llm.activation_quant import (
    ActivationKVConfig,
    RotationChoice,
    prepare_activation_quant_,
)
from pvtune.llm.activations import (
    XTXCollector,
    capture_block_inputs,
    largest_divisor_at_most,
    minibatches,
    run_block,
)
from pvtune.llm.budget import EMBEDDINGS, HEAD, BudgetConfig, BudgetPlan, plan_budget, type_config
from pvtune.llm.data import CalibrationConfig
from pvtune.llm.model import BlockStructure, find_blocks
from pvtune.nn.quantized_embedding import EmbeddingCompression, compress_embeddings_
from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.nn.replace import set_submodule
from pvtune.reprs.base import ReprConfig, check_int, check_range, round_to_fp16
from pvtune.reprs.gguf_block import GGUFBlockConfig
from pvtune.rotation.fold import RotationConfig, RotationReport, rotate_model_

log = logging.getLogger(__name__)

SELECTION_SAMPLES = 128  # calibration sequences the adaptive rotation choice measures


@dataclass(frozen=True)
class BlockFinetuneConfig:
    """Adam on a block's continuous parameters (scales, codebooks, norms, biases) to match
    the uncompressed block's outputs: ``steps`` steps on mini-batches of
    :attr:`CompressConfig.batch_size` calibration sequences (reshuffled every pass).

    The block is reverted if the fine-tuning does not lower its output error.
    """

    steps: int = 20
    lr: float = 1e-3

    def __post_init__(self) -> None:
        check_int(self, "steps", self.steps)
        check_range(self, "steps", self.steps, 0, None)
        check_range(self, "lr", self.lr, 0.0, None)


@dataclass(frozen=True)
class CompressConfig:
    """What to compress with and how.

    ``method`` names a registered initialiser (``rtn``, ``gptq``, ``aqlm``) and
    ``method_config`` its settings (its defaults when None); ``representation`` is the
    weight format of every linear layer inside the decoder blocks. ``dense_storage`` says how
    the parameters left uncompressed (embeddings, norms, head) are stored: ``float16`` rounds
    them to float16 values, ``float32`` keeps them. ``embeddings``, when set, compresses the
    token embeddings (round to nearest; a tied head shares them) in that representation.
    ``budget``, when set, replaces one representation for all: each decoder linear, the
    embeddings and an untied head get the GGUF block type (or float16) that
    :mod:`pvtune.llm.budget` chooses for them from measured sensitivities, within the size
    budget (``representation`` then only names the family, ``embeddings`` must be None).
    """

    method: str
    representation: ReprConfig
    method_config: Any = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    block_finetune: BlockFinetuneConfig | None = None
    batch_size: int = 8
    dense_storage: str = "float16"
    embeddings: ReprConfig | None = None
    budget: BudgetConfig | None = None
    rotation: RotationConfig | None = None
    activations: ActivationKVConfig | None = None

    def __post_init__(self) -> None:
        init = get_init(self.method)  # KeyError lists the known methods
        if self.activations is not None:
            if not isinstance(self.activations, ActivationKVConfig):
                raise ConfigError("CompressConfig.activations must be an ActivationKVConfig")
            if self.rotation is not None:
                raise ConfigError("CompressConfig: activation quantization chooses its own "
                                  "rotations (ActivationKVConfig.rotations); leave rotation "
                                  "unset")
            if self.budget is not None:
                raise ConfigError("CompressConfig: a size budget plans a GGUF file, which "
                                  "cannot hold quantized activations; use a fixed "
                                  "representation")
        if self.budget is not None:
            if not any(issubclass(GGUFBlockConfig, t) for t in init.repr_types):
                raise ConfigError(f"CompressConfig.budget chooses GGUF block types, which "
                                  f"method {self.method!r} does not make; use rtn or gptq")
            if self.embeddings is not None:
                raise ConfigError("CompressConfig.budget chooses the embeddings' type too; "
                                  "leave embeddings unset")
        if not isinstance(self.representation, init.repr_types):
            allowed = ", ".join(t.__name__ for t in init.repr_types)
            raise ConfigError(
                f"CompressConfig.representation: method {self.method!r} works with {allowed}, "
                f"got {type(self.representation).__name__}"
            )
        if self.method_config is None:
            object.__setattr__(self, "method_config", init.config_cls())
        elif not isinstance(self.method_config, init.config_cls):
            raise ConfigError(
                f"CompressConfig.method_config must be a {init.config_cls.__name__} for "
                f"method {self.method!r}, got {type(self.method_config).__name__}"
            )
        check_range(self, "batch_size", self.batch_size, 1, None)
        if self.dense_storage not in ("float16", "float32"):
            raise ConfigError(
                f"CompressConfig.dense_storage must be 'float16' or 'float32', "
                f"got {self.dense_storage!r}"
            )


@dataclass
class LayerReport:
    """One compressed linear layer."""

    name: str
    out_features: int
    in_features: int
    bits_per_param: float
    output_error: float | None  # tr(dW H dW^T) / tr(W H W^T) on calibration inputs
    seconds: float


@dataclass
class CompressReport:
    """What :func:`compress_model` did."""

    layers: list[LayerReport] = field(default_factory=list)
    block_losses: list[tuple[float, float]] = field(default_factory=list)  # before/after FT
    seconds: float = 0.0
    plan: BudgetPlan | None = None  # the storage type of every tensor, under a budget
    rotation: RotationReport | None = None  # the rotations folded into the weights
    activations: RotationChoice | None = None  # the rotations behind quantized activations


def check_layers_fit(model: nn.Module, structure: BlockStructure, config: CompressConfig) -> None:
    """Fail before any work when the representation cannot fit a layer's shape (under a
    budget, each tensor takes only the types that fit it)."""
    if config.budget is not None:
        return
    for i, block in enumerate(structure.blocks):
        for name, m in block.named_modules():
            if isinstance(m, nn.Linear):
                try:
                    config.representation.check_shape(m.out_features, m.in_features)
                except ValueError as err:
                    full = f"{structure.path}.{i}.{name}"
                    raise ConfigError(
                        f"cannot compress layer {full!r} ({m.out_features}x{m.in_features}): {err}"
                    ) from None
    emb = model.get_input_embeddings() if config.embeddings is not None else None
    if isinstance(emb, nn.Embedding):
        try:
            config.embeddings.check_shape(emb.num_embeddings, emb.embedding_dim)
        except ValueError as err:
            raise ConfigError(f"cannot compress the embeddings ({emb.num_embeddings}x"
                              f"{emb.embedding_dim}): {err}") from None


def compress_model(
    model: nn.Module, calibration_ids: Tensor | None, config: CompressConfig,
    progress: bool = True, dist: DistributedContext | None = None, metadata_bytes: int = 0,
    sensitivities: dict | None = None,
) -> CompressReport:
    """Compress every linear layer inside ``model``'s decoder blocks in place.

    ``calibration_ids`` (``[N, L]`` token ids) may be None only for methods that need no
    calibration (``rtn``). With ``dist`` (several processes, :mod:`pvtune.distributed`) the
    linear layers of each block are split across the ranks, balanced by size; each rank
    initialises its own and the results are broadcast, so every rank ends with the whole
    compressed model (the same codes as one process: each layer's initialisation depends only
    on its weight and its inputs).

    Rotations (:attr:`CompressConfig.rotation`) are folded in before anything else; so are
    quantized activations and KV cache with their rotations (:attr:`CompressConfig.activations`,
    chosen on the first :data:`SELECTION_SAMPLES` calibration sequences), and the layers are
    then compressed seeing the inputs their weights multiply. Under
    :attr:`CompressConfig.budget` the storage types are chosen next, on the
    uncompressed model and ``calibration_ids`` (:func:`pvtune.llm.budget.plan_budget`;
    ``metadata_bytes`` is what the file holds besides tensors; ``sensitivities``, the
    :func:`~pvtune.llm.budget.measure_options` of the same model after the same rotation,
    skips their measurement), and recorded in the report.
    """
    dist = dist or DistributedContext()
    progress = progress and dist.is_main
    structure = find_blocks(model)
    check_layers_fit(model, structure, config)
    init = get_init(config.method)
    report = CompressReport()
    start = time.perf_counter()
    model.eval()
    if config.rotation is not None:
        report.rotation = rotate_model_(model, config.rotation)
    if config.activations is not None:
        samples = None if calibration_ids is None else calibration_ids[:SELECTION_SAMPLES]
        report.activations = prepare_activation_quant_(model, config.activations, samples)
    layer_reprs: dict[str, ReprConfig | None] = {}
    embeddings = EmbeddingCompression(config.embeddings) if config.embeddings else None
    if config.budget is not None:
        if calibration_ids is None:
            raise ConfigError("a size budget needs calibration token ids to measure "
                              "sensitivities")
        report.plan = plan_budget(model, calibration_ids, config.budget, metadata_bytes,
                                  progress, sensitivities)
        layer_reprs = {k: type_config(t) for k, t in report.plan.types.items()}
        if layer_reprs.get(EMBEDDINGS) is not None or layer_reprs.get(HEAD) is not None:
            embeddings = EmbeddingCompression(layer_reprs.get(EMBEDDINGS),
                                              layer_reprs.get(HEAD))
    reprs = _LayerReprs(config.representation, layer_reprs)
    if not init.needs_calibration:
        _compress_without_data(structure, config, report, progress, dist, reprs)
    else:
        if calibration_ids is None:
            raise ConfigError(f"method {config.method!r} needs calibration token ids")
        _compress_with_data(model, structure, calibration_ids, config, report, progress, dist,
                            reprs)
    if embeddings is not None:
        done = compress_embeddings_(model, embeddings)
        log.info("embeddings compressed: %s", done)
    _round_storage(model, config.dense_storage)
    report.seconds = time.perf_counter() - start
    return report


@dataclass(frozen=True)
class _LayerReprs:
    """The representation of each decoder linear: ``default``, or its entry in ``chosen``
    (by full name; None keeps the layer dense)."""

    default: ReprConfig
    chosen: dict

    def of(self, full_name: str) -> ReprConfig | None:
        return self.chosen.get(full_name, self.default) if self.chosen else self.default


def _quantize_linear(block, name, xtx, config, prefix, rep_config) -> LayerReport:
    init = get_init(config.method)
    linear = block.get_submodule(name)
    t0 = time.perf_counter()
    qweight = init.fn(linear.weight.detach().float(), xtx, rep_config,
                      config.method_config)
    set_submodule(block, name, QuantizedLinear.replacing(linear, qweight))
    err = None
    if xtx is not None:
        with torch.no_grad():
            w = linear.weight.detach().float()
            dw = qweight() - w
            err = float(((dw @ xtx) * dw).sum() / ((w @ xtx) * w).sum().clamp(min=1e-30))
    return LayerReport(f"{prefix}.{name}", linear.out_features, linear.in_features,
                       qweight.bits_per_param(), err, time.perf_counter() - t0)


def _quantize_block(block, names, xtx_of, config, prefix, dist: DistributedContext,
                    reprs: _LayerReprs) -> list[LayerReport]:
    """Quantize the linear layers ``names`` of ``block``: all here, or each on its owner
    rank, the compressed weight then sent to every rank. Layers whose representation is
    None stay dense."""
    names = [n for n in names if reprs.of(f"{prefix}.{n}") is not None]
    if not dist.active:
        return [_quantize_linear(block, n, xtx_of(n), config, prefix, reprs.of(f"{prefix}.{n}"))
                for n in names]
    sizes = {n: block.get_submodule(n).weight.numel() for n in names}
    owner = assign_layers(sizes, dist.world_size)
    mine = {n: _quantize_linear(block, n, xtx_of(n), config, prefix, reprs.of(f"{prefix}.{n}"))
            for n in names if owner[n] == dist.rank}
    reports = []
    for n in names:
        # process-to-process only (never a file): the compressed module travels pickled
        payload = [(block.get_submodule(n).qweight, mine[n])] if n in mine else [None]
        dist.broadcast_objects(payload, src=owner[n])
        qweight, layer_report = payload[0]
        if n not in mine:
            linear = block.get_submodule(n)
            set_submodule(block, n, QuantizedLinear.replacing(linear, qweight))
        reports.append(layer_report)
    return reports


def _compress_without_data(structure, config, report, progress, dist, reprs) -> None:
    for i, block in enumerate(tqdm(structure.blocks, desc=f"compress ({config.method})",
                                   disable=not progress, unit="block")):
        report.layers += _quantize_block(block, structure.linear_names(i), lambda n: None,
                                         config, f"{structure.path}.{i}", dist, reprs)


def _compress_with_data(model, structure, ids, config, report, progress, dist, reprs) -> None:
    batch = largest_divisor_at_most(ids.shape[0], config.batch_size)
    inputs, extras = capture_block_inputs(model, structure, ids, batch)
    bar = tqdm(total=len(structure.blocks), desc=f"compress ({config.method})",
               disable=not progress, unit="block")
    for i, block in enumerate(structure.blocks):
        prefix = f"{structure.path}.{i}"
        targets = torch.empty_like(inputs)
        collector = XTXCollector(block)
        with torch.no_grad():
            for sl in minibatches(inputs.shape[0], batch):
                collector.new_call()
                targets[sl] = run_block(block, inputs[sl], extras[i])
        collector.remove()
        report.layers += _quantize_block(block, structure.linear_names(i), collector.xtx,
                                         config, prefix, dist, reprs)
        del collector
        if config.block_finetune is not None and config.block_finetune.steps > 0:
            report.block_losses.append(
                finetune_block(block, inputs, targets, extras[i], config.block_finetune, batch)
            )
        with torch.no_grad():
            for sl in minibatches(inputs.shape[0], batch):
                inputs[sl] = run_block(block, inputs[sl], extras[i])
        errs = [r.output_error for r in report.layers if r.name.startswith(prefix + ".")]
        if errs:
            bar.set_postfix(block=i, mean_err=f"{sum(errs) / len(errs):.4f}")
        bar.update()
    bar.close()


def _block_loss(block, inputs, targets, extra, batch) -> float:
    total, norm = 0.0, 0.0
    with torch.no_grad():
        for sl in minibatches(inputs.shape[0], batch):
            out = run_block(block, inputs[sl], extra)
            total += float((out - targets[sl]).pow(2).sum())
            norm += float(targets[sl].pow(2).sum())
    return total / max(norm, 1e-30)


def finetune_block(
    block: nn.Module, inputs: Tensor, targets: Tensor, extra, config: BlockFinetuneConfig,
    capture_batch: int,
) -> tuple[float, float]:
    """Adam on the block's continuous parameters against the reference outputs; returns the
    relative output error ``||out - ref||^2 / ||ref||^2`` before and after."""
    before = _block_loss(block, inputs, targets, extra, capture_batch)
    params = [p for p in block.parameters() if p.requires_grad]
    snapshot = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=config.lr)
    gen = torch.Generator().manual_seed(0)
    n = inputs.shape[0]
    step = capture_batch  # extras were recorded for this batch size
    norm = targets.pow(2).mean()
    batches: list[Tensor] = []
    block.train()
    for _ in range(config.steps):
        if not batches:
            batches = list(torch.randperm(n, generator=gen).split(step))[: n // step]
        idx = batches.pop()
        opt.zero_grad(set_to_none=True)
        out = run_block(block, inputs[idx], extra)
        loss = (out - targets[idx]).pow(2).mean() / norm
        loss.backward()
        opt.step()
    block.eval()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, QuantizedLinear):
                for p in m.qweight.parameters():
                    p.copy_(round_to_fp16(p))
    after = _block_loss(block, inputs, targets, extra, capture_batch)
    if after > before:  # a too-large learning rate must not make the block worse
        log.warning("block fine-tuning raised the output error (%.4g -> %.4g); reverted it. "
                    "Try a smaller learning rate (BlockFinetuneConfig.lr, now %g)", before, after,
                    config.lr)
        with torch.no_grad():
            for p, saved in zip(params, snapshot, strict=True):
                p.copy_(saved)
        after = before
    return before, after


def _round_storage(model: nn.Module, dense_storage: str) -> None:
    """Round continuous parameters to their stored precision (float16 values)."""
    with torch.no_grad():
        quantized = set()
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                for p in m.qweight.parameters():
                    p.copy_(round_to_fp16(p))
                    quantized.add(id(p))
        if dense_storage == "float16":
            for p in model.parameters():
                if id(p) not in quantized and p.is_floating_point():
                    p.copy_(round_to_fp16(p))
