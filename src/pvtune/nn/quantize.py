"""The verbs: ``quantize_`` swaps ``nn.Linear`` layers for ``QuantizedLinear`` in place,
``dequantize_`` swaps them back."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from tqdm.auto import tqdm

from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.reprs.base import ReprConfig, representation_for

FilterFn = Callable[[nn.Module, str], bool]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def quantize_(
    model: nn.Module,
    config: ReprConfig,
    filter_fn: FilterFn | None = None,
    *,
    progress: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` for which ``filter_fn(module, name)`` is true (all by
    default) with a :class:`QuantizedLinear` compressed by ``config``; returns ``model``.

    Raises ValueError naming the layer when ``config`` cannot represent its shape.
    """
    if not isinstance(config, ReprConfig):
        raise TypeError(f"quantize_ needs a representation config, got {type(config).__name__}")
    representation_for(config)  # fail early on an unregistered config type
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (filter_fn is None or filter_fn(module, name))
    ]
    for name, linear in tqdm(targets, desc="quantize", disable=not progress):
        try:
            qlinear = QuantizedLinear.from_linear(linear, config)
        except ValueError as err:
            shape = f"{linear.out_features}x{linear.in_features}"
            raise ValueError(f"cannot quantize layer {name!r} ({shape}): {err}") from None
        _set_submodule(model, name, qlinear)
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every :class:`QuantizedLinear` with an ``nn.Linear`` of its decoded weight."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, qlinear in targets:
        _set_submodule(model, name, qlinear.to_linear())
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every :class:`QuantizedLinear` in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def linear_bits_per_param(model: nn.Module) -> float:
    """Weighted average bits per weight over the quantized linear layers (0 if none)."""
    layers = quantized_layers(model).values()
    total = sum(m.in_features * m.out_features for m in layers)
    bits = sum(m.bits_per_param() * m.in_features * m.out_features for m in layers)
    return bits / total if total else 0.0
