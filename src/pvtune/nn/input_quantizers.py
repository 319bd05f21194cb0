"""The kinds of input quantizer a compressed layer can carry, and their checkpoint records.

A compressed layer's ``input_quantizer`` (binary networks' sign, an LSQ grid, per-token
activation quantization with an online rotation) is saved as a small JSON record and rebuilt
from it on load; its tensors (learned steps, rotation signs) travel in the state dict. A
class joins with :func:`register_input_quantizer` and implements ``to_spec()`` and
``from_spec(spec)``. A record without a ``kind`` is the original one (:mod:`pvtune.qat`'s
sign/LSQ quantizer, registered as ``"qat"``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pvtune.errors import CheckpointError, UnknownNameError
from pvtune.registry import Registry

INPUT_QUANTIZER_KINDS: Registry[str, type] = Registry("input quantizer kind")
DEFAULT_KIND = "qat"


def register_input_quantizer(kind: str):
    """Class decorator: layers carrying this quantizer record it as ``kind``."""

    def wrap(cls: type) -> type:
        cls.spec_kind = kind
        return INPUT_QUANTIZER_KINDS.register(kind, cls)

    return wrap


def input_quantizer_spec(quantizer: nn.Module) -> dict[str, Any]:
    """The checkpoint record of ``quantizer``."""
    kind = getattr(type(quantizer), "spec_kind", None)
    if kind is None or kind not in INPUT_QUANTIZER_KINDS:
        raise CheckpointError(f"cannot save an input quantizer of type "
                              f"{type(quantizer).__name__}: register it with "
                              "pvtune.nn.input_quantizers.register_input_quantizer")
    spec = quantizer.to_spec()
    return spec if kind == DEFAULT_KIND else {"kind": kind, **spec}


def input_quantizer_from_spec(spec: dict[str, Any]) -> nn.Module:
    """The (untrained) input quantizer a checkpoint record describes."""
    if not isinstance(spec, dict):
        raise CheckpointError(f"bad input quantizer record {spec!r}: not an object")
    try:
        cls = INPUT_QUANTIZER_KINDS.get(spec.get("kind", DEFAULT_KIND))
    except UnknownNameError as err:
        raise CheckpointError(f"bad input quantizer record: {err}") from None
    return cls.from_spec({k: v for k, v in spec.items() if k != "kind"})
