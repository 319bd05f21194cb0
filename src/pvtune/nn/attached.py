"""Modules a conversion attaches to a model's own modules (not replacing a layer), and their
checkpoint records.

A key/value-cache quantizer sits on an attention module as ``kv_quantizer``; nothing in the
model's architecture has that name, so a checkpoint records it (``layout["attached"]``: its
qualified name, kind and settings) and loading builds it and installs it before the state
dict is read. A class joins with :func:`register_attached` and implements ``to_spec()``,
``from_spec(spec)`` and ``install(model, name)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pvtune.errors import CheckpointError, UnknownNameError
from pvtune.registry import Registry

ATTACHED_KINDS: Registry[str, type] = Registry("attached module kind")


def register_attached(kind: str):
    """Class decorator: checkpoints record modules of this class as ``kind``."""

    def wrap(cls: type) -> type:
        cls.attached_kind = kind
        return ATTACHED_KINDS.register(kind, cls)

    return wrap


def attached_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every attached module of ``model`` (an instance of a registered kind) by name."""
    kinds = tuple(ATTACHED_KINDS.get(k) for k in ATTACHED_KINDS)
    return {n: m for n, m in model.named_modules() if kinds and isinstance(m, kinds)}


def attached_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The checkpoint records of every attached module of ``model``."""
    return {n: {"kind": type(m).attached_kind, **m.to_spec()}
            for n, m in attached_modules(model).items()}


def install_attached_(model: nn.Module, specs: dict[str, Any], source: str) -> None:
    """Build and install the attached modules ``specs`` describes (a :class:`CheckpointError`
    for a record that does not fit the model)."""
    if not isinstance(specs, dict):
        raise CheckpointError(f"{source}: the layout's 'attached' entry must be an object")
    for name, spec in specs.items():
        if not isinstance(spec, dict):
            raise CheckpointError(f"{source}: attached module {name!r}: bad record {spec!r}")
        try:
            cls = ATTACHED_KINDS.get(spec.get("kind"))
        except UnknownNameError as err:
            raise CheckpointError(f"{source}: attached module {name!r}: {err}") from None
        module = cls.from_spec({k: v for k, v in spec.items() if k != "kind"})
        cls.install(model, name, module)
