"""The verbs: ``quantize_`` swaps ``nn.Linear`` layers for ``QuantizedLinear`` in place,
``dequantize_`` swaps them back."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn
from tqdm.auto import tqdm

from pvtune.errors import ConfigError
from pvtune.nn.input_quantized_linear import InputQuantizedLinear
from pvtune.nn.quantized_conv import QuantizedConv2d
from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.nn.replace import set_submodule
from pvtune.registry import Registry
from pvtune.reprs.base import ReprConfig, representation_for

if TYPE_CHECKING:
    from pvtune.qat.config import QATConfig

FilterFn = Callable[[nn.Module, str], bool]
QuantizeHandler = Callable[[nn.Module, object, "FilterFn | None"], nn.Module]
# config types that quantize_ hands to another verb (pvtune.qat registers QATConfig)
QUANTIZE_HANDLERS: Registry[type, QuantizeHandler] = Registry("quantize_ handler")


def register_quantize_handler(config_type: type, *,
                              overwrite: bool = False) -> Callable[[QuantizeHandler],
                                                                   QuantizeHandler]:
    """Decorator: ``quantize_(model, config, filter_fn)`` with a ``config_type`` config
    calls the decorated ``handler(model, config, filter_fn)`` instead of compressing."""
    return QUANTIZE_HANDLERS.decorator(config_type, overwrite=overwrite)


def quantize_(
    model: nn.Module,
    config: ReprConfig | QATConfig,
    filter_fn: FilterFn | None = None,
    *,
    progress: bool = False,
    include_conv: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``model`` for which ``filter_fn(module, name)`` is
    true (all by default) with a :class:`QuantizedLinear` compressed by ``config``; returns
    ``model``. ``include_conv`` also compresses ``nn.Conv2d`` layers (as
    :class:`~pvtune.nn.QuantizedConv2d`, the kernel seen as ``[out, in/groups * kh * kw]``).

    All or nothing: every layer is compressed before any is swapped in, so a failure leaves
    ``model`` untouched. Raises :class:`ConfigError` naming the layer when ``config`` cannot
    represent its shape. A :class:`~pvtune.qat.QATConfig` instead prepares the model for
    training through an estimator (:func:`pvtune.qat.prepare_qat_`; convolutions too).
    A bare ``nn.Linear`` cannot replace itself in place: use
    ``QuantizedLinear.from_linear(linear, config)``.
    """
    handler = next((QUANTIZE_HANDLERS.get(c) for c in type(config).__mro__
                    if c in QUANTIZE_HANDLERS), None)
    if handler is not None:  # e.g. a QATConfig: train through an estimator instead
        return handler(model, config, filter_fn)
    if not isinstance(config, ReprConfig):
        raise TypeError(f"quantize_ needs a representation config, got {type(config).__name__}")
    representation_for(config)  # fail early on an unregistered config type
    if isinstance(model, nn.Linear):
        raise ConfigError(
            "quantize_ replaces the linear layers inside a model, and this model is itself an "
            "nn.Linear; use QuantizedLinear.from_linear(linear, config) instead"
        )
    kinds = (nn.Linear, InputQuantizedLinear, nn.Conv2d) if include_conv else \
        (nn.Linear, InputQuantizedLinear)  # a linear behind an input quantizer keeps it
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in kinds and (filter_fn is None or filter_fn(module, name))
    ]
    for name, layer in targets:  # shapes first: no compression work before a shape error
        out_f, in_f = layer.weight.shape[0], layer.weight[0].numel()
        try:
            config.check_shape(out_f, in_f)
        except ValueError as err:
            raise ConfigError(f"cannot quantize layer {name!r} ({out_f}x{in_f}): {err}") from None
    replacements = []
    for name, layer in tqdm(targets, desc="quantize", disable=not progress):
        try:
            if isinstance(layer, nn.Conv2d):
                replacements.append((name, QuantizedConv2d.from_conv(layer, config)))
            else:
                replacements.append((name, QuantizedLinear.from_linear(layer, config)))
        except ValueError as err:
            shape = f"{layer.weight.shape[0]}x{layer.weight[0].numel()}"
            raise ConfigError(f"cannot quantize layer {name!r} ({shape}): {err}") from None
    for name, qlinear in replacements:
        set_submodule(model, name, qlinear)
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Replace every :class:`QuantizedLinear` with the plain module it stands for, holding
    its decoded weight (``nn.Linear``; ``nn.Embedding`` for a compressed embedding table;
    ``nn.Conv2d`` for a :class:`~pvtune.nn.QuantizedConv2d`). Layers that share one
    representation (a head tied to the embeddings) share one decoded weight again."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    shared: dict[int, nn.Parameter] = {}
    for name, qlinear in targets:
        dense = qlinear.to_dense_module()
        holder = dense[-1] if isinstance(dense, nn.Sequential) else dense
        first = shared.setdefault(id(qlinear.qweight), holder.weight)
        if first is not holder.weight and first.shape == holder.weight.shape:
            holder.weight = first
        set_submodule(model, name, dense)
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every :class:`QuantizedLinear` in ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def decoder_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """The :class:`QuantizedLinear` layers that are not compressed embeddings nor share their
    representation with another layer (a head tied to the embeddings)."""
    from pvtune.nn.quantized_embedding import QuantizedEmbedding

    layers = quantized_layers(model)
    owners = {id(m.qweight) for m in layers.values() if isinstance(m, QuantizedEmbedding)}
    return {n: m for n, m in layers.items() if id(m.qweight) not in owners}


def linear_bits_per_param(model: nn.Module) -> float:
    """Weighted average bits per weight over the quantized linear layers, compressed
    embeddings and a head tied to them excluded (0 if none)."""
    layers = decoder_layers(model).values()
    total = sum(m.in_features * m.out_features for m in layers)
    bits = sum(m.bits_per_param() * m.in_features * m.out_features for m in layers)
    return bits / total if total else 0.0
