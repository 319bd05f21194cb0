"""The contract every weight representation follows: ``W = decode(codes, theta)``.

A representation is an ``nn.Module`` holding integer ``codes`` (buffers, no gradient) and
continuous parameters ``theta`` (``nn.Parameter``). ``forward()`` returns the dense
``[out_features, in_features]`` weight, differentiable with respect to ``theta``.

Codes are organised in *encode groups*: runs of ``code_group_size`` consecutive input
weights of one output row whose codes are re-fitted together (one weight for scalar
grids, one vector for VQ, one block of M for N:M sparsity). ``encode(target, groups)``
re-fits the codes of the selected groups to a dense target with ``theta`` fixed; the
``groups`` mask has shape ``[out_features, in_features // code_group_size]``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.packing import IntCodec
from pvtune.registry import Registry


def check_range(config: object, field: str, value: float, lo: float, hi: float | None) -> None:
    """Raise a :class:`ConfigError` naming ``Config.field`` and its allowed range when out of
    range or not a number (NaN is out of every range)."""
    name = f"{type(config).__name__}.{field}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if hi is None:
        if not value >= lo:
            raise ConfigError(f"{name} must be >= {lo}, got {value}")
    elif not lo <= value <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value}")


def check_int(config: object, field: str, value: object) -> None:
    """Raise a :class:`ConfigError` unless ``value`` is a plain int (bool excluded)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{type(config).__name__}.{field} must be an int, got {value!r}")


@dataclass(frozen=True)
class ReprConfig:
    """Base of every representation config: frozen, validated, JSON-serialisable.

    Subclasses validate their fields in ``__post_init__`` and shape-dependent rules in
    :meth:`check_shape`.
    """

    type_name: ClassVar[str] = ""

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raise :class:`ConfigError` if this config cannot represent an ``[out, in]`` weight."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with a ``type`` key naming the registered representation."""
        return {"type": self.type_name, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ReprConfig:
        """Inverse of :meth:`to_dict`; a :class:`ConfigError` names what does not fit."""
        if not isinstance(data, dict):
            raise ConfigError(f"a representation config must be a JSON object, got {data!r}")
        data = dict(data)
        type_name = data.pop("type", None)
        if type_name is None:
            raise ConfigError(f"representation config has no 'type' key: {data}")
        cls = CONFIG_TYPES.get(type_name)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as err:  # a wrong-typed value deep in a comparison
            raise ConfigError(f"{cls.__name__}: {err}") from None


def check_group_divides(config: ReprConfig, field: str, group: int, in_features: int) -> None:
    """Raise a :class:`ConfigError` if ``group`` does not divide ``in_features``."""
    if in_features % group:
        divisors = [d for d in range(1, min(in_features, 4096) + 1) if in_features % d == 0]
        raise ConfigError(
            f"{type(config).__name__}.{field}={group} does not divide in_features={in_features}; "
            f"allowed values divide {in_features}, e.g. {divisors[-6:]}"
        )


def uniform_noise(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Uniform ``[0, 1)`` noise shaped like ``like``, drawn on the CPU (``generator`` is a CPU
    generator) and moved to ``like``'s device: the same numbers on every device."""
    return torch.rand(like.shape, generator=generator, dtype=like.dtype).to(like.device)


class QuantizedWeight(nn.Module):
    """Base class of weight representations (see the module docstring for the contract)."""

    config_cls: ClassVar[type[ReprConfig]] = ReprConfig
    # what :meth:`step_unit` measures: "grid" (the spacing of a scalar grid) or "rms" (a
    # scale of the weights' magnitude); default discrete step sizes differ between the two
    step_unit_kind: ClassVar[str] = "rms"

    def __init__(self, out_features: int, in_features: int, config: ReprConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}")
        config.check_shape(out_features, in_features)
        self.out_features = out_features
        self.in_features = in_features
        self.config = config

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: Tensor, config: ReprConfig) -> Self:
        """Compress a dense ``[out, in]`` weight (calibration-free initialisation)."""
        weight = weight.detach().to(torch.float32)
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
        module = cls(weight.shape[0], weight.shape[1], config).to(weight.device)
        module.init_from_dense(weight)
        return module

    def init_from_dense(self, weight: Tensor) -> None:
        """Fill codes and continuous parameters from a dense weight."""
        raise NotImplementedError

    # -- the representation -------------------------------------------------------------
    def forward(self) -> Tensor:
        """The dense ``[out, in]`` weight, differentiable w.r.t. the continuous parameters."""
        raise NotImplementedError

    def decode_groups(self, index: Tensor) -> Tensor:
        """Decoded values of the encode groups at flat ``index`` (into the row-major
        :attr:`groups_shape`), ``[len(index), code_group_size]``, without gradient; equal to
        the same entries of :meth:`forward`. Subclasses decode only those groups."""
        with torch.no_grad():
            return self().reshape(-1, self.code_group_size)[index]

    @property
    def code_group_size(self) -> int:
        """Consecutive input weights whose codes are re-fitted together."""
        return 1

    @property
    def groups_shape(self) -> tuple[int, int]:
        """Shape of the ``groups`` mask accepted by :meth:`encode`."""
        return self.out_features, self.in_features // self.code_group_size

    def encode(
        self, target: Tensor, groups: Tensor | None = None, beam_size: int | None = None
    ) -> None:
        """Re-fit codes of the selected groups (all if None) to ``target``, theta fixed.

        Never increases the reconstruction error ``||forward() - target||`` of any group.
        ``beam_size`` sets the search width of codebook representations (None: the config's);
        representations with an exact nearest-code rule ignore it.
        """
        raise NotImplementedError

    def encode_groups(self, index: Tensor, values: Tensor,
                      beam_size: int | None = None) -> None:
        """Re-fit the codes of the encode groups at flat ``index`` (into the row-major
        :attr:`groups_shape`) to ``values`` (``[len(index), code_group_size]``), theta fixed:
        the same codes as :meth:`encode` of a target holding ``values`` in those groups, with
        those groups selected. Scalar grids touch only those entries; this default builds
        the full target."""
        values = self._check_group_values(index, values)
        target = self().detach().to(torch.float32).clone()
        target.view(-1, self.code_group_size)[index] = values
        mask = torch.zeros(self.groups_shape[0] * self.groups_shape[1], dtype=torch.bool,
                           device=index.device)
        mask[index] = True
        self.encode(target, mask.view(self.groups_shape), beam_size=beam_size)

    def stochastic_encode(
        self, target: Tensor, generator: torch.Generator | None = None,
        groups: Tensor | None = None, beam_size: int | None = None,
    ) -> None:
        """Random rounding: each selected group moves to the codes nearest ``target`` with
        probability ``e_old / (e_old + e_new)`` (``e`` = distance of each candidate to the
        target), else keeps its current codes. Scalar grids override this with exact
        unbiased rounding between neighbouring levels."""
        target, groups = self._check_inputs(target, groups, beam_size)
        with torch.no_grad():
            old = self.snapshot_codes()
            w_old = self().detach()
            self.encode(target, groups, beam_size=beam_size)
            w_new = self().detach()
            shape = (*self.groups_shape, self.code_group_size)
            e_old = (w_old - target).reshape(shape).norm(dim=-1)
            e_new = (w_new - target).reshape(shape).norm(dim=-1)
            p_move = e_old / (e_old + e_new).clamp(min=1e-30)
            self.restore_codes(old, keep=uniform_noise(p_move, generator) < p_move)

    def step_unit(self) -> Tensor:
        """The size of the code cells around each weight: a tensor ``u`` of shape ``[r, k]``
        (``r`` is ``out_features`` or 1, ``k`` divides ``in_features``) giving weight
        ``(o, i)`` the unit ``u[o, i // (in_features // k)]`` (see :func:`times_unit`).
        Discrete steps move weights in these units, so a step size means the same on a model
        whose weights are 8x smaller. Subclasses return their grid step or scale; this
        default is the RMS of each decoded row."""
        with torch.no_grad():
            return self().pow(2).mean(-1, keepdim=True).sqrt()

    def change_threshold(self) -> Tensor | None:
        """How far a target must lie from the decoded weight before re-encoding can change
        that weight's code: a tensor shaped like :meth:`step_unit` (weight units), or None
        when no such bound is known (any group may change). A discrete step skips the groups
        whose targets all lie nearer than this, without re-encoding them."""
        return None

    def lut_matmul(self, x: Tensor) -> Tensor | None:
        """``x @ W.T`` computed from the codes without decoding ``W`` (a lookup-table
        kernel), or None when this representation has no such kernel for ``x``."""
        return None

    def bits_per_param(self) -> float:
        """Exact storage cost in bits per weight of the packed format (codes + theta)."""
        raise NotImplementedError

    def integer_codecs(self) -> dict[str, IntCodec]:
        """How each integer buffer is packed on disk (buffer name -> codec)."""
        return {}

    @property
    def code_buffers(self) -> tuple[str, ...]:
        """Names of the buffers a discrete step changes: shape ``[out, ...]`` with either one
        entry per encode group or one per weight along dim 1."""
        return ("codes",)

    def snapshot_codes(self) -> dict[str, Tensor]:
        """Copies of the code buffers, for :meth:`restore_codes`."""
        return {name: getattr(self, name).clone() for name in self.code_buffers}

    def restore_codes(self, snapshot: dict[str, Tensor], keep: Tensor) -> None:
        """Put back the ``snapshot`` codes of every group outside the ``keep`` groups mask."""
        with torch.no_grad():
            for name, before in snapshot.items():
                buf = getattr(self, name)
                buf.copy_(torch.where(self.expand_groups(keep, buf), buf, before))

    def snapshot_groups(self, index: Tensor) -> dict[str, Tensor]:
        """Copies of the code buffers' entries of the encode groups at flat ``index`` (into
        the row-major :attr:`groups_shape`), for :meth:`restore_groups`: a step that changes
        only those groups saves and restores them without touching the others."""
        return {name: self._per_group(name)[index] for name in self.code_buffers}

    def restore_groups(self, index: Tensor, snapshot: dict[str, Tensor]) -> None:
        """Put back the codes :meth:`snapshot_groups` took of the groups at ``index``."""
        with torch.no_grad():
            for name, before in snapshot.items():
                self._per_group(name)[index] = before

    def _per_group(self, name: str) -> Tensor:
        """The code buffer ``name`` as a view of one row per encode group (code buffers are
        ``[out, groups, ...]`` or ``[out, in]`` with each group's weights consecutive)."""
        return getattr(self, name).view(self.groups_shape[0] * self.groups_shape[1], -1)

    def expand_groups(self, groups: Tensor, buffer: Tensor) -> Tensor:
        """Broadcast a ``groups`` mask to the shape of a code buffer."""
        if buffer.shape[1] == groups.shape[1]:
            return groups.view(*groups.shape, *([1] * (buffer.dim() - 2))).expand_as(buffer)
        return groups.repeat_interleave(self.code_group_size, dim=1).view_as(buffer)

    # -- helpers for subclasses ---------------------------------------------------------
    def _check_target(self, target: Tensor) -> Tensor:
        if tuple(target.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"target shape {tuple(target.shape)} != weight shape "
                f"{(self.out_features, self.in_features)}"
            )
        target = target.detach().to(torch.float32)
        # one pass: float32 entries cannot overflow a float64 sum, which is finite exactly
        # when every entry is (the entry-wise check only counts the bad ones)
        if not math.isfinite(float(target.sum(dtype=torch.float64))):
            _require_finite(target, "target has")
        return target

    def _check_group_values(self, index: Tensor, values: Tensor) -> Tensor:
        """Validated ``values`` of :meth:`encode_groups` (float32, finite, one row of
        ``code_group_size`` per index)."""
        if tuple(values.shape) != (index.numel(), self.code_group_size):
            raise ValueError(f"values shape {tuple(values.shape)} != (len(index), group size) "
                             f"{(index.numel(), self.code_group_size)}")
        values = values.detach().to(torch.float32)
        _require_finite(values, "values have")
        return values

    def _check_inputs(self, target: Tensor, groups: Tensor | None,
                      beam_size: int | None) -> tuple[Tensor, Tensor | None]:
        """Validated ``(target, groups)`` of :meth:`encode`; ``beam_size`` None or >= 1."""
        self._check_beam_size(beam_size)
        return self._check_target(target), self._check_groups(groups)

    @staticmethod
    def _check_beam_size(beam_size: int | None) -> None:
        if beam_size is not None and (isinstance(beam_size, bool)
                                      or not isinstance(beam_size, int) or beam_size < 1):
            raise ValueError(f"beam_size must be a positive int or None, got {beam_size!r}")

    def _check_groups(self, groups: Tensor | None) -> Tensor | None:
        if groups is None:
            return None
        if groups.dtype != torch.bool or tuple(groups.shape) != self.groups_shape:
            raise ValueError(
                f"groups must be a bool mask of shape {self.groups_shape}, "
                f"got {groups.dtype} {tuple(groups.shape)}"
            )
        return groups

    def group_errors(self, target: Tensor) -> Tensor:
        """Squared reconstruction error per encode group, shape :attr:`groups_shape`."""
        with torch.no_grad():
            diff = (self() - target).view(*self.groups_shape, self.code_group_size)
            return diff.pow(2).sum(-1)

    def extra_repr(self) -> str:
        return f"{self.out_features}x{self.in_features}, {self.config}"


REPRESENTATIONS: Registry[type[ReprConfig], type[QuantizedWeight]] = Registry("representation")
CONFIG_TYPES: Registry[str, type[ReprConfig]] = Registry("representation config type")


def register_representation(name: str):
    """Class decorator registering a :class:`QuantizedWeight` subclass under ``name``.

    Registers its ``config_cls`` too, so ``quantize_(model, config)`` and checkpoint loading
    find it without any if-chain.
    """

    def wrap(cls: type[QuantizedWeight]) -> type[QuantizedWeight]:
        config_cls = cls.config_cls
        config_cls.type_name = name
        CONFIG_TYPES.register(name, config_cls)
        REPRESENTATIONS.register(config_cls, cls)
        return cls

    return wrap


def representation_for(config: ReprConfig) -> type[QuantizedWeight]:
    """The representation class registered for ``type(config)``."""
    return REPRESENTATIONS.get(type(config))


def _require_finite(x: Tensor, what: str) -> None:
    """A ValueError naming how many entries of ``x`` are NaN or inf (none: nothing)."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what} {bad} non-finite value(s) (NaN or inf): no code is nearest "
                         "to them; the dense weights or buffer have diverged")


def times_unit(x: Tensor, unit: Tensor) -> Tensor:
    """The weight-shaped ``x`` multiplied entry by entry by its :meth:`~QuantizedWeight.step_unit`
    ``unit`` (without materialising the unit at full size)."""
    k = unit.shape[1]
    return (x.view(x.shape[0], k, -1) * unit.unsqueeze(-1)).view(x.shape)


def round_to_fp16(x: Tensor) -> Tensor:
    """Round values to the nearest float16 (kept in the input dtype), so they store exactly."""
    return x.to(torch.float16).to(x.dtype)


def ceil_log2(n: int) -> int:
    """Bits needed to index ``n`` items."""
    return max(1, math.ceil(math.log2(n)))
