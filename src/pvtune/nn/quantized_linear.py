"""``QuantizedLinear``: a linear layer whose weight is a :class:`QuantizedWeight`."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvtune.errors import CheckpointError
from pvtune.registry import Registry
from pvtune.reprs.base import QuantizedWeight, ReprConfig, representation_for

# inputs of at most this many tokens go through a representation's lookup-table kernel
# (when it has one); larger ones decode the weight and multiply densely. Measured on
# SmolLM2 AQLM 2x8g8, 2 threads (benchmarks/results/decode_kernel.md): the kernel is 1.28x,
# 1.34x, 1.04x the dense path at 1, 2, 3 tokens per step and 0.83x at 4
LUT_MAX_TOKENS = 3


# the layer classes a checkpoint layout can name, by the "kind" of their entry
LAYER_KINDS: Registry[str, type] = Registry("compressed layer kind")


def register_layer_kind(kind: str):
    """Class decorator: checkpoints record layers of this class as ``kind`` and rebuild them
    with its :meth:`QuantizedLinear.from_layout`."""

    def wrap(cls: type) -> type:
        cls.layout_kind = kind
        return LAYER_KINDS.register(kind, cls)

    return wrap


class QuantizedLinear(nn.Module):
    """``y = x W^T + b`` with ``W = qweight()`` decoded from codes on every call.

    The representation lives in ``qweight``; ``weight`` is the decoded dense tensor (a
    read-only property, so code that asks a linear layer for ``.weight.dtype`` keeps working).
    """

    def __init__(self, qweight: QuantizedWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.qweight = qweight
        self.in_features = qweight.in_features
        self.out_features = qweight.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._cache: tuple | None = None
        # When True, forward keeps the decoded weight with .retain_grad(), so after backward
        # ``dense_weight.grad`` holds dL/dW for discrete (V) steps.
        self.track_dense_grad = False
        self.dense_weight: Tensor | None = None
        # an optional module applied to the input first (activation quantization, e.g. the
        # sign of a binary network frozen by pvtune.qat.freeze_)
        self.input_quantizer: nn.Module | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: ReprConfig) -> QuantizedLinear:
        """Compress ``linear.weight`` with the representation registered for ``config``."""
        qweight = representation_for(config).from_dense(linear.weight, config)
        return cls.replacing(linear, qweight.to(linear.weight.device))

    @classmethod
    def replacing(cls, module: nn.Module, qweight: QuantizedWeight) -> QuantizedLinear:
        """The layer holding ``qweight`` in ``module``'s place: ``module``'s bias, and its
        input quantizer when it has one (an activation quantizer, an online rotation)."""
        layer = cls(qweight, module.bias)
        layer.input_quantizer = getattr(module, "input_quantizer", None)
        return layer

    layout_kind: ClassVar[str] = "linear"

    def layout_spec(self) -> dict[str, Any]:
        """What a checkpoint layout records of this layer beyond its shape and config."""
        return {}

    @classmethod
    def layout_problem(cls, spec: dict[str, Any]) -> str | None:
        """What is wrong with a layout entry of this kind (None: nothing)."""
        return None

    @classmethod
    def from_layout(cls, current: nn.Module, name: str, spec: dict[str, Any], source: str,
                    done: dict[str, QuantizedLinear]) -> QuantizedLinear:
        """An empty layer for the checkpoint entry ``spec`` of ``name``, in place of the
        model's ``current`` module (``done``: the layers rebuilt so far, for a tied head);
        a :class:`CheckpointError` when the two do not fit."""
        if not isinstance(current, nn.Linear | QuantizedLinear):
            raise CheckpointError(f"{source}: layer {name!r} is a {type(current).__name__} in "
                                  "the model, not a linear layer")
        shape = (spec["out_features"], spec["in_features"])
        if (current.out_features, current.in_features) != shape:
            raise CheckpointError(
                f"{source}: layer {name!r} is {current.out_features}x{current.in_features} in "
                f"the model but {shape[0]}x{shape[1]} in the checkpoint (another model size?)"
            )
        if (current.bias is not None) != spec["bias"]:
            has = "has" if current.bias is not None else "has no"
            raise CheckpointError(
                f"{source}: layer {name!r} {has} bias in the model but the checkpoint says "
                f"bias={spec['bias']} (a checkpoint of another architecture?)"
            )
        if "shares" in spec:
            first = done.get(spec["shares"])
            if first is None or (first.out_features, first.in_features) != shape:
                raise CheckpointError(f"{source}: layer {name!r} shares {spec['shares']!r}, "
                                      "which is missing or of another shape")
            return QuantizedLinear(first.qweight,
                                   torch.zeros(shape[0]) if spec["bias"] else None)
        try:
            config = ReprConfig.from_dict(spec["config"])
            return cls.empty(*shape, config, spec["bias"])
        except ValueError as err:
            raise CheckpointError(f"{source}: layer {name!r}: {err}") from None

    @classmethod
    def empty(cls, out_features: int, in_features: int, config: ReprConfig, bias: bool):
        """An uninitialised layer of the right shapes, to load a checkpoint into."""
        qweight = representation_for(config)(out_features, in_features, config)
        return cls(qweight, torch.zeros(out_features) if bias else None)

    @property
    def weight(self) -> Tensor:
        """The decoded dense weight ``[out, in]``."""
        return self.qweight()

    def _dense_weight(self) -> Tensor:
        """Decode, reusing the last decoding under no-grad while codes and parameters are
        unchanged (in-place updates bump each tensor's version counter)."""
        if torch.is_grad_enabled():
            self._cache = None
            w = self.qweight()
            if self.track_dense_grad:
                if not w.requires_grad:  # no continuous parameter needs grad: make W a leaf
                    w = w.detach().requires_grad_(True)
                w.retain_grad()
                previous = self.dense_weight
                if previous is not None and previous.grad is not None:
                    # micro-batches accumulate into dL/dW until zero_grad drops it
                    w.grad = previous.grad
                self.dense_weight = w
            return w
        tensors = [*self.qweight.parameters(), *self.qweight.buffers()]
        key = tuple((id(t), t._version) for t in tensors)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.qweight())
        return self._cache[1]

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if not torch.is_grad_enabled() and x.numel() <= LUT_MAX_TOKENS * x.shape[-1]:
            y = self.qweight.lut_matmul(x)  # decoding a token or a few: no dense weight
            if y is not None:
                return y.to(x.dtype) if self.bias is None else (y + self.bias).to(x.dtype)
        w = self._dense_weight()
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the decoded weight."""
        with torch.no_grad():
            w = self.qweight()
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            linear = linear.to(device=w.device, dtype=w.dtype)
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def to_dense_module(self) -> nn.Module:
        """The plain module this layer replaces (``nn.Linear``), behind its input quantizer
        when it has one."""
        dense = self.to_linear()
        return dense if self.input_quantizer is None else nn.Sequential(self.input_quantizer,
                                                                      dense)

    def bits_per_param(self) -> float:
        """Bits per weight of the compressed matrix (bias excluded)."""
        return self.qweight.bits_per_param()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


LAYER_KINDS.register("linear", QuantizedLinear)
