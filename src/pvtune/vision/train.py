"""Train a small image classifier through discrete weights: full precision, QAT with a named
estimator (:mod:`pvtune.qat`), or PV-Tuning (:class:`pvtune.optim.PVOptimizer`) from the
round-to-nearest projection of the same initial network; log what the papers log and
evaluate the model as frozen (codes), which is what a user saves."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pvtune.errors import ConfigError
from pvtune.nn.quantize import linear_bits_per_param, quantize_
from pvtune.optim.pv import PVOptimizer
from pvtune.optim.strategies import VStepConfig
from pvtune.qat.config import QATConfig
from pvtune.qat.convert import QATSchedule, freeze_, qat_layers
from pvtune.qat.diagnostics import FlipTracker, layer_bits, reste_layer_indicators
from pvtune.reprs.base import ReprConfig
from pvtune.vision.data import ImageData
from pvtune.vision.models import ACTIVATIONS, MLP, SmallCNN, hidden_layers_only


@dataclass(frozen=True)
class PVMethod:
    """PV-Tuning from scratch: the initial network is rounded to ``representation`` (hidden
    layers), then Adam trains the continuous parameters (scales, norms, full-precision ends)
    and ``vstep`` the codes, for the same steps as the other methods."""

    representation: ReprConfig
    vstep: VStepConfig = field(default_factory=VStepConfig)


@dataclass(frozen=True)
class TorchPruningPeer:
    """The peer for N:M sparsity: PyTorch's own ``torch.ao.pruning.WeightNormSparsifier``
    (``n`` of every ``m`` input weights kept by magnitude, the mask recomputed after every
    optimizer step, pruned weights receive no gradient through the parametrization). It
    handles linear layers only (not 4-d convolution kernels): use it with ``arch="mlp"``."""

    n: int = 2
    m: int = 4


@dataclass(frozen=True)
class TrainConfig:
    """One training run of :class:`~pvtune.vision.models.SmallCNN`.

    ``method``: None (full precision), a :class:`~pvtune.qat.QATConfig`, a
    :class:`PVMethod` or the :class:`TorchPruningPeer`; the hidden layers are the discrete
    ones, the first layer and the head stay full precision. ``arch``: ``cnn``
    (:class:`SmallCNN`, ``width`` channels) or ``mlp`` (:class:`MLP`, three hidden layers of
    ``hidden`` units). Adam with a cosine learning rate over ``epochs``."""

    method: QATConfig | PVMethod | TorchPruningPeer | None = None
    arch: str = "cnn"
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    width: int = 16
    hidden: int = 128
    act: str = "relu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method is not None and not isinstance(self.method, QATConfig | PVMethod
                                                      | TorchPruningPeer):
            raise ConfigError("TrainConfig.method must be None (full precision), a QATConfig, "
                              f"a PVMethod or a TorchPruningPeer, got "
                              f"{type(self.method).__name__}")
        if self.arch not in ("cnn", "mlp"):
            raise ConfigError(f"TrainConfig.arch must be cnn or mlp, got {self.arch!r}")
        if isinstance(self.method, TorchPruningPeer) and self.arch != "mlp":
            raise ConfigError("torch.ao.pruning's sparsifier handles linear layers only: use "
                              "arch='mlp' with TorchPruningPeer")
        for name in ("epochs", "batch_size", "width", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ConfigError(f"TrainConfig: need lr > 0 and weight_decay >= 0, got "
                              f"lr={self.lr}, weight_decay={self.weight_decay}")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"TrainConfig.act must be one of {ACTIVATIONS}, got {self.act!r}")

    @property
    def method_name(self) -> str:
        """``fp32``, ``qat``, ``pv`` or ``peer``."""
        if self.method is None:
            return "fp32"
        if isinstance(self.method, TorchPruningPeer):
            return "peer"
        return "qat" if isinstance(self.method, QATConfig) else "pv"


@dataclass
class TrainResult:
    """A run's per-epoch history and final figures (accuracy of the frozen model)."""

    history: list[dict[str, Any]]
    test_accuracy: float
    bits_per_param: float
    seconds: float
    model: nn.Module

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no model)."""
        return {"test_accuracy": self.test_accuracy, "bits_per_param": self.bits_per_param,
                "seconds": self.seconds, "history": self.history}


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` (evaluation mode) on ``x, y``."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            correct += int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
    model.train(was)
    return correct / max(len(x), 1)


def build_model(config: TrainConfig, data: ImageData) -> nn.Module:
    """The network of ``config`` for ``data``, prepared for its method."""
    torch.manual_seed(config.seed)
    channels, height, width = data.image_shape
    if config.arch == "mlp":
        h = config.hidden
        model = MLP((channels * height * width, h, h, h, data.num_classes))
    else:
        model = SmallCNN(channels, height, data.num_classes, config.width, config.hidden,
                         config.act)
    if isinstance(config.method, QATConfig):
        quantize_(model, config.method, filter_fn=hidden_layers_only)
    elif isinstance(config.method, PVMethod):
        quantize_(model, config.method.representation, filter_fn=hidden_layers_only,
                  include_conv=True)
    return model


def train_classifier(config: TrainConfig, data: ImageData, *, progress: bool = True
                     ) -> TrainResult:
    """Train on ``data.train_*``, evaluate on ``data.test_*`` after every epoch, freeze a
    QAT model at the end and report the frozen model's accuracy.

    Logged per epoch: loss, train and test accuracy; for QAT the entries of the discrete
    state that changed summed over the epoch's steps (``flips``; ``sad`` for N:M masks),
    their mean fraction per step, and ReSTE's indicators at the epoch's last step; for PV
    the encode groups the V steps changed."""
    start = time.perf_counter()
    model = build_model(config, data)
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(data.train_x) / config.batch_size)
    total = steps_per_epoch * config.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    base = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    pv = None
    if isinstance(config.method, PVMethod):
        pv = PVOptimizer(model, base, config.method.vstep)
    peer = _prepare_peer(model, config.method) if isinstance(config.method,
                                                            TorchPruningPeer) else None
    qat = isinstance(config.method, QATConfig)
    schedule = QATSchedule(model, total) if qat else None
    flips = FlipTracker(model) if qat else None
    history: list[dict[str, Any]] = []
    step = 0
    bar = tqdm(total=total, desc=f"train ({config.method_name})", disable=not progress,
               unit="step")
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(data.train_x), generator=gen)
        loss_sum = correct = seen = changed = sad = 0.0
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            x, y = data.train_x[idx], data.train_y[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            scale = 0.5 * (1 + math.cos(math.pi * step / total))
            if pv is not None:
                stats = pv.step(lr_scale=scale)
                changed += stats.groups_changed
                pv.zero_grad()
            else:
                for group in base.param_groups:
                    group["lr"] = config.lr * scale
                base.step()
                if peer is not None:
                    peer.step()  # the sparsifier recomputes its masks
                if qat and i + config.batch_size >= len(order):  # the epoch's last step
                    indicators = reste_layer_indicators(model)  # needs the gradients
                base.zero_grad(set_to_none=True)
            if schedule is not None:
                schedule.step()
                report = flips.update()
                changed += report["changed"]
                sad += report["sad"]
                weights_total = report["total"]
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss_sum / seen:.3f}")
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss_sum / seen,
                               "train_accuracy": correct / seen,
                               "test_accuracy": accuracy(model, data.test_x, data.test_y)}
        if qat:
            row["flips"] = changed
            row["flip_fraction_per_step"] = changed / max(1, weights_total * steps_per_epoch)
            row["sad"] = sad
            row["reste"] = indicators
        elif pv is not None:
            row["groups_changed"] = changed
        history.append(row)
    bar.close()
    if qat:
        model.eval()
        before = accuracy(model, data.test_x, data.test_y)
        bits = layer_bits(model)
        weights = {n: m.flat_latent().numel() for n, m in qat_layers(model).items()}
        freeze_(model)
        frozen = accuracy(model, data.test_x, data.test_y)
        if frozen != before:
            raise RuntimeError(f"the frozen model's accuracy {frozen} differs from the trained "
                               f"model's {before}: freeze_ is broken")
        bits_pp = sum(bits[n] * weights[n] for n in bits) / sum(weights.values())
    else:
        if peer is not None:
            peer.squash_mask()  # plain weights with the zeros in them
        frozen = accuracy(model, data.test_x, data.test_y)
        bits_pp = linear_bits_per_param(model) if pv is not None else 32.0
    return TrainResult(history, frozen, bits_pp, time.perf_counter() - start, model)


def _prepare_peer(model: nn.Module, peer: TorchPruningPeer):
    """torch.ao.pruning's N:M sparsifier on the hidden linear layers of ``model``."""
    from torch.ao.pruning import WeightNormSparsifier

    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, peer.m),
                                      zeros_per_block=peer.m - peer.n)
    layers = [{"tensor_fqn": f"{n}.weight"} for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and hidden_layers_only(m, n)]
    sparsifier.prepare(model, layers)
    sparsifier.step()
    return sparsifier
