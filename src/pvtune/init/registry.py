"""Layer-wise initialisers: turn a dense weight (and the layer's input statistics) into a
compressed representation. Each is registered under a name with its own config type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from pvtune.registry import Registry
from pvtune.reprs.base import QuantizedWeight, ReprConfig


class InitFn(Protocol):
    """``init(weight, xtx, repr_config, method_config) -> QuantizedWeight``.

    ``xtx`` is ``E[x x^T]`` of the layer's calibration inputs (``[in, in]``), or None for
    methods that need no calibration.
    """

    def __call__(
        self, weight: Tensor, xtx: Tensor | None, repr_config: ReprConfig, method_config
    ) -> QuantizedWeight: ...


@dataclass(frozen=True)
class InitMethod:
    """A registered initialiser: its function, config type, and what it needs."""

    fn: InitFn
    config_cls: type
    repr_types: tuple[type[ReprConfig], ...]
    needs_calibration: bool


INIT_METHODS: Registry[str, InitMethod] = Registry("initialisation method")


def register_init(
    name: str, config_cls: type, repr_types: tuple[type[ReprConfig], ...], needs_calibration: bool
) -> Callable[[InitFn], InitFn]:
    """Decorator registering an initialiser under ``name``."""

    def wrap(fn: InitFn) -> InitFn:
        INIT_METHODS.register(name, InitMethod(fn, config_cls, repr_types, needs_calibration))
        return fn

    return wrap


def get_init(name: str) -> InitMethod:
    """The initialiser registered under ``name``."""
    return INIT_METHODS.get(name)
