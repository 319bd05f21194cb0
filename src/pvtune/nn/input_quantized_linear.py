"""``InputQuantizedLinear``: a full-precision ``nn.Linear`` whose input passes through an
input quantizer (activation quantization, an online rotation) first.

Compressed layers carry an ``input_quantizer`` of their own; this is the same for a layer
whose weight is not compressed (yet). It stays an ``nn.Linear`` (same parameters, same state
dict keys plus the quantizer's), and a checkpoint records it as an attached module, so it
saves and reloads with the model.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from pvtune.errors import CheckpointError
from pvtune.nn.attached import register_attached
from pvtune.nn.input_quantizers import input_quantizer_from_spec, input_quantizer_spec
from pvtune.nn.replace import set_submodule


@register_attached("input_quantized_linear")
class InputQuantizedLinear(nn.Linear):
    """``linear(input_quantizer(x))``, sharing ``linear``'s weight and bias."""

    def __init__(self, linear: nn.Linear, input_quantizer: nn.Module) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_quantizer = input_quantizer

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.input_quantizer(x))

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` (same parameters), without the input quantizer."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight, linear.bias = self.weight, self.bias
        return linear

    def to_spec(self) -> dict[str, Any]:
        """A checkpoint's record: the input quantizer's."""
        return {"input_quantizer": input_quantizer_spec(self.input_quantizer)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> nn.Module:
        """The input quantizer a record describes (installed onto the model's linear)."""
        if "input_quantizer" not in spec:
            raise CheckpointError(f"bad input-quantized linear record {spec!r}")
        return input_quantizer_from_spec(spec["input_quantizer"])

    @staticmethod
    def install(model: nn.Module, name: str, quantizer: nn.Module) -> None:
        """Put ``quantizer`` in front of the model's linear ``name``."""
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"layer {name!r} does not exist in the model (a checkpoint "
                                  "of another architecture?)") from None
        if not isinstance(current, nn.Linear):
            raise CheckpointError(f"layer {name!r} is a {type(current).__name__}, not a linear "
                                  "layer an input quantizer can sit in front of")
        if isinstance(current, InputQuantizedLinear):
            current = current.to_linear()
        set_submodule(model, name, InputQuantizedLinear(current, quantizer))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", input quantized"
