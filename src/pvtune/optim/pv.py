"""``PVOptimizer``: a continuous (P) step by any torch optimizer, then a discrete (V) step on
the codes of every compressed weight.

    base = torch.optim.Adam(continuous_params, lr=3e-5, betas=(0.9, 0.95))
    opt = PVOptimizer(model, base, VStepConfig(strategy="subspace_v_ste"))
    loss.backward(); stats = opt.step(lr_scale=schedule(t)); opt.zero_grad()

``step()`` reads as the algorithm: the P step, then the V step; ``lr_scale`` (a schedule's
factor) scales both. The dense gradient ``dL/dW`` of each compressed weight is captured by
its :class:`QuantizedLinear` during the forward pass (``track_dense_grad``). Continuous
parameters stay at the precision a checkpoint stores them in (:mod:`pvtune.optim.precision`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.nn.quantize import decoder_layers
from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.optim.precision import StoredPrecision, storage_dtypes
from pvtune.optim.strategies import STRATEGIES, VStepConfig, WeightState, apply_trust_ratio


@dataclass(frozen=True)
class StepStats:
    """What one step did: the encode groups whose codes changed, and the seconds spent in
    the continuous (P) and discrete (V) steps."""

    groups_changed: int
    groups_total: int
    seconds_continuous: float = 0.0
    seconds_discrete: float = 0.0

    @property
    def fraction_changed(self) -> float:
        """Changed groups / all groups."""
        return self.groups_changed / max(1, self.groups_total)


def continuous_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter: scales, codebooks, norms, biases, uncompressed weights."""
    return [p for p in model.parameters() if p.requires_grad]


class PVOptimizer:
    """Wraps ``base`` (which owns the continuous parameters) and adds the discrete step.

    ``dense_storage`` says how the model's uncompressed parameters are stored: ``float16``
    keeps them float16-exact through training (fp32 master copies), ``float32`` leaves them
    as they are. The compressed layers' continuous parameters are always kept float16-exact,
    the precision their representations store.

    ``owned`` (layer names; default all) limits the V step and its state to those layers: a
    data-parallel run that gives each weight an owner rank steps each weight on one rank
    and sends the changed codes to the others (:mod:`pvtune.llm.data_parallel`).
    ``discrete_context`` (a context-manager factory) surrounds the code steps and the set-up
    of their state: with FSDP, :func:`pvtune.llm.sharding.full_parameters` makes the
    decoded weights whole there.
    """

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, config: VStepConfig,
                 dense_storage: str = "float32", owned: Collection[str] | None = None,
                 discrete_context: Callable[[], AbstractContextManager] = nullcontext) -> None:
        self.config = config
        self.base = base
        self.strategy = STRATEGIES.get(config.strategy)
        # code steps act on the decoder's linears; compressed embeddings (and a head tied to
        # them) keep their codes, their continuous parameters train with the base optimizer
        self.layers: dict[str, QuantizedLinear] = decoder_layers(model)
        if not self.layers and self.strategy.moves_codes:
            raise ConfigError("the model has no QuantizedLinear layers: quantize it first")
        self.owned = set(self.layers) if owned is None else set(owned)
        unknown = sorted(self.owned - set(self.layers))
        if unknown:
            raise ConfigError(f"PVOptimizer: owned names no compressed layer: {unknown[:5]}")
        self.discrete_context = discrete_context
        self.states: dict[str, WeightState] = {}
        self.weight_configs: dict[str, VStepConfig] = {}  # lr resolved per representation
        check = getattr(self.strategy, "check", None)  # a strategy for some representations
        with discrete_context():
            for name, layer in self.layers.items():
                if check is not None:
                    check(layer.qweight)
                layer.track_dense_grad = True
                if name in self.owned:
                    self.states[name] = WeightState(layer.qweight, self.strategy.needs_buffer)
                self.weight_configs[name] = config.for_weight(layer.qweight)
        self.precision = StoredPrecision(model, storage_dtypes(model, dense_storage))
        self._base_lrs = [group["lr"] for group in base.param_groups]
        self._scaled = False  # a torch LR scheduler on ``base`` works while lr_scale stays 1
        self.steps = 0

    def zero_grad(self) -> None:
        """Clear continuous gradients and the captured dense weight gradients."""
        self.base.zero_grad(set_to_none=True)
        for layer in self.layers.values():
            layer.dense_weight = None

    def step(self, lr_scale: float = 1.0) -> StepStats:
        """One PV step: P (the base optimizer on the continuous parameters) then V (the codes
        of every compressed weight), both with their learning rates times ``lr_scale``.
        Deterministic given the gradients and the step count."""
        if not lr_scale >= 0:
            raise ConfigError(f"lr_scale must be >= 0, got {lr_scale}")
        start = time.perf_counter()
        self._p_step(lr_scale)
        middle = time.perf_counter()
        with self.discrete_context():
            changed, total = self._v_step(lr_scale)
        self.steps += 1
        return StepStats(changed, total, middle - start, time.perf_counter() - middle)

    def _p_step(self, lr_scale: float) -> None:
        if lr_scale != 1.0 or self._scaled:
            self._scaled = True
            for group, lr in zip(self.base.param_groups, self._base_lrs, strict=True):
                group["lr"] = lr * lr_scale
        with self.precision.master_weights():
            self.base.step()

    def _v_step(self, lr_scale: float) -> tuple[int, int]:
        changed = total = 0
        if not self.strategy.moves_codes:  # no dense gradient needed
            return 0, sum(math.prod(layer.qweight.groups_shape)
                          for name, layer in self.layers.items() if name in self.owned)
        for index, (name, layer) in enumerate(self.layers.items()):
            if name not in self.owned:  # its owner rank steps it (same seed by index)
                continue
            if layer.dense_weight is None or layer.dense_weight.grad is None:
                raise RuntimeError(
                    f"no dense gradient for {name!r}: run forward and backward (in training "
                    "mode, with gradients enabled) before step()"
                )
            rep = layer.qweight
            grad = layer.dense_weight.grad.detach().to(torch.float32)
            # a strategy that counts its changes needs no copy of every code, unless the
            # trust ratio may roll some back
            counted = self.strategy.counts_changes and self.config.trust_ratio is None
            codes_before = None if counted else rep.snapshot_codes()
            with torch.no_grad():
                w_before = rep().detach() if self.config.trust_ratio is not None else None
            gen = torch.Generator().manual_seed(
                (self.config.seed * 1_000_003 + index * 7_919 + self.steps) % 2**63
            )
            config = self.weight_configs[name]
            if lr_scale != 1.0:
                config = dataclasses.replace(config, lr=config.step_size * lr_scale)
            count = self.strategy(rep, grad, self.states[name], config, gen)
            if w_before is not None:
                apply_trust_ratio(rep, w_before, codes_before, self.config.trust_ratio)
            changed += count if counted else _groups_changed(rep, codes_before)
            total += rep.groups_shape[0] * rep.groups_shape[1]
        return changed, total

    # -- checkpointing (tensors only: safetensors, never pickle) ----------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        """The discrete-step state and the master copies as a flat dict of tensors."""
        out = {"pv.steps": torch.tensor(self.steps)}
        for name, state in self.states.items():
            for key, t in state.tensors().items():
                out[f"pv.{name}.{key}"] = t
        for name, master in self.precision.state_tensors().items():
            out[f"master.{name}"] = master
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_tensors`."""
        self.steps = int(tensors["pv.steps"])
        for name, state in self.states.items():
            prefix = f"pv.{name}."
            state.load({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.precision.load_state_tensors(
            {k[len("master."):]: v for k, v in tensors.items() if k.startswith("master.")})


def _groups_changed(rep, codes_before: dict[str, Tensor]) -> int:
    device = next(iter(codes_before.values())).device
    changed = torch.zeros(rep.groups_shape, dtype=torch.bool, device=device)
    for name, old in codes_before.items():
        diff = getattr(rep, name) != old
        changed |= diff.reshape(rep.groups_shape[0], rep.groups_shape[1], -1).any(-1)
    return int(changed.sum())
