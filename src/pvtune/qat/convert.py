"""The QAT verbs: :func:`prepare_qat_` swaps linear and conv layers for QAT layers,
:func:`set_progress_` steps every estimator's schedule, :func:`freeze_` turns the trained
latent weights into codes (ordinary pvtune layers, saved by the ordinary checkpoint)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pvtune.errors import ConfigError
from pvtune.nn.input_quantized_linear import InputQuantizedLinear
from pvtune.nn.quantize import register_quantize_handler
from pvtune.nn.quantized_conv import QuantizedConv2d
from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.nn.replace import set_submodule
from pvtune.qat.config import QATConfig
from pvtune.qat.layers import QATConv2d, QATLayer, QATLinear

FilterFn = Callable[[nn.Module, str], bool]


def _shape_of(module: nn.Module) -> tuple[int, int]:
    w = module.weight
    return w.shape[0], w[0].numel()


@register_quantize_handler(QATConfig)
def prepare_qat_(model: nn.Module, config: QATConfig, filter_fn: FilterFn | None = None
                 ) -> nn.Module:
    """Replace every ``nn.Linear`` (and ``nn.Conv2d`` when ``config.conv``) for which
    ``filter_fn(module, name)`` holds with a :class:`QATLinear` / :class:`QATConv2d`;
    returns ``model``. All or nothing: shapes are checked before any layer is swapped."""
    kinds = (nn.Linear, InputQuantizedLinear, nn.Conv2d) if config.conv else \
        (nn.Linear, InputQuantizedLinear)
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) in kinds and (filter_fn is None or filter_fn(m, n))]
    if not targets:
        raise ConfigError("prepare_qat_: no layer to train (no nn.Linear or nn.Conv2d "
                          "passes the filter)")
    replacements = []
    for name, module in targets:
        try:
            config.representation.check_shape(*_shape_of(module))
            cls = QATLinear if isinstance(module, nn.Linear) else QATConv2d
            layer = cls(module, config)
            if isinstance(module, InputQuantizedLinear):  # its quantizer comes along
                if layer.input_quantizer is not None:
                    raise ValueError("it already has an input quantizer and the config "
                                     "asks for activation quantization as well")
                layer.input_quantizer = module.input_quantizer
            replacements.append((name, module, layer))
        except ValueError as err:
            raise ConfigError(f"cannot train layer {name!r} ({type(module).__name__} "
                              f"{tuple(module.weight.shape)}) as "
                              f"{config.representation.type_name}: {err}") from None
    for name, module, layer in replacements:
        layer.train(module.training)
        set_submodule(model, name, layer)
    return model


def qat_layers(model: nn.Module) -> dict[str, QATLayer]:
    """Every QAT layer of ``model`` by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QATLayer)}


def set_progress_(model: nn.Module, progress: float) -> None:
    """Tell every QAT layer how far training is (0 to 1): ReSTE's power and other schedules
    follow it. :class:`pvtune.qat.QATSchedule` calls this every step."""
    if not 0.0 <= progress <= 1.0:
        raise ConfigError(f"progress must be in [0, 1], got {progress}")
    for layer in qat_layers(model).values():
        layer.set_progress(progress)


class QATSchedule:
    """Steps the estimators' schedules: call :meth:`step` after every optimizer step of a
    run of ``total_steps`` steps (progress goes from 0 to 1)."""

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        if total_steps < 1:
            raise ConfigError(f"QATSchedule: total_steps must be >= 1, got {total_steps}")
        self.model, self.total_steps, self.steps = model, total_steps, 0
        set_progress_(model, 0.0)

    @property
    def progress(self) -> float:
        """Fraction of the run done."""
        return min(self.steps / self.total_steps, 1.0)

    def step(self) -> None:
        """One optimizer step is done."""
        self.steps += 1
        set_progress_(self.model, self.progress)


def freeze_(model: nn.Module) -> nn.Module:
    """Replace every QAT layer by a :class:`QuantizedLinear` / :class:`QuantizedConv2d`
    holding the codes and continuous parameters its latent weights project to (evaluation
    mode: stochastic rounding rounds to nearest); input quantizers move along. The frozen
    model computes what the QAT model computes in evaluation mode, bit for bit, and saves
    with :func:`pvtune.save_quantized`."""
    layers = qat_layers(model)
    if not layers:
        raise ConfigError("freeze_: the model has no QAT layer (prepare it with "
                          "quantize_(model, QATConfig(...)) and train it first)")
    for name, layer in layers.items():
        rep = layer.projection.freeze(layer.flat_latent().detach())
        rep.to(layer.weight.device)
        bias = None if layer.bias is None else layer.bias.detach()
        if isinstance(layer, QATConv2d):
            frozen = QuantizedConv2d(rep, bias, in_channels=layer.in_channels,
                                     kernel_size=layer.kernel_size, stride=layer.stride,
                                     padding=layer.padding, dilation=layer.dilation,
                                     groups=layer.groups)
        else:
            frozen = QuantizedLinear(rep, bias)
        frozen.input_quantizer = layer.input_quantizer
        frozen.train(layer.training)
        set_submodule(model, name, frozen)
    return model
