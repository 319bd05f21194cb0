"""``QuantizedConv2d``: a 2-d convolution whose kernel is a :class:`QuantizedWeight`.

The kernel ``[out, in/groups, kh, kw]`` is held as the matrix ``[out, in/groups * kh * kw]``,
so every representation, checkpoint and bit count treats it like a linear layer's weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvtune.errors import CheckpointError
from pvtune.nn.quantized_linear import QuantizedLinear, register_layer_kind
from pvtune.reprs.base import QuantizedWeight, ReprConfig, representation_for


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


@register_layer_kind("conv2d")
class QuantizedConv2d(QuantizedLinear):
    """``conv2d(x, W)`` with ``W`` decoded from ``qweight`` and reshaped to the kernel."""

    def __init__(self, qweight: QuantizedWeight, bias: Tensor | None, *, in_channels: int,
                 kernel_size: tuple[int, int], stride: tuple[int, int] = (1, 1),
                 padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1),
                 groups: int = 1) -> None:
        super().__init__(qweight, bias)
        kh, kw = kernel_size
        if in_channels % groups or qweight.in_features != in_channels // groups * kh * kw:
            raise ValueError(f"a {qweight.out_features}x{qweight.in_features} weight cannot "
                             f"hold a conv kernel of {in_channels} channels, groups={groups}, "
                             f"kernel {kh}x{kw}")
        self.in_channels, self.out_channels = in_channels, qweight.out_features
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation, self.groups = tuple(padding), tuple(dilation), groups

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, config: ReprConfig) -> QuantizedConv2d:
        """Compress ``conv``'s kernel with the representation registered for ``config``."""
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("only numeric zero padding is supported, got padding="
                             f"{conv.padding!r}, padding_mode={conv.padding_mode!r}")
        flat = conv.weight.reshape(conv.out_channels, -1)
        qweight = representation_for(config).from_dense(flat, config).to(flat.device)
        return cls(qweight, conv.bias, in_channels=conv.in_channels,
                   kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride),
                   padding=tuple(conv.padding), dilation=tuple(conv.dilation),
                   groups=conv.groups)

    def conv_spec(self) -> dict[str, Any]:
        """The convolution's geometry, as a checkpoint layout records it."""
        return {"in_channels": self.in_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups}

    def layout_spec(self) -> dict[str, Any]:
        return {"conv": self.conv_spec()}

    @classmethod
    def layout_problem(cls, spec: dict[str, Any]) -> str | None:
        conv = spec.get("conv")
        pairs = ("kernel_size", "stride", "padding", "dilation")
        if isinstance(conv, dict) and _is_int(conv.get("in_channels"), 1) \
                and _is_int(conv.get("groups"), 1) \
                and all(isinstance(conv.get(k), list) and len(conv[k]) == 2
                        and all(_is_int(v) for v in conv[k]) for k in pairs):
            return None
        return ("a conv2d layer needs 'conv' with in_channels, groups (positive ints), "
                f"kernel_size, stride, padding and dilation (pairs of ints), got {conv!r}")

    @classmethod
    def from_layout(cls, current, name, spec, source, done) -> QuantizedConv2d:
        """An empty compressed convolution for the checkpoint entry ``spec`` in place of the
        model's 2-d convolution ``current`` (plain, compressed or in QAT)."""
        conv = spec["conv"]
        geometry = (spec["out_features"], conv["in_channels"], tuple(conv["kernel_size"]),
                    conv["groups"])
        if not all(hasattr(current, a) for a in ("out_channels", "in_channels", "kernel_size",
                                                   "groups")):
            raise CheckpointError(f"{source}: layer {name!r} is a {type(current).__name__} in "
                                  "the model, not a 2-d convolution")
        have = (current.out_channels, current.in_channels, tuple(current.kernel_size),
                current.groups)
        if have != geometry or (getattr(current, "bias", None) is not None) != spec["bias"]:
            raise CheckpointError(f"{source}: convolution {name!r} is (out, in, kernel, groups) "
                                  f"= {have} in the model but {geometry} in the checkpoint, or "
                                  "its bias differs")
        try:
            config = ReprConfig.from_dict(spec["config"])
            rep = representation_for(config)(spec["out_features"], spec["in_features"], config)
            bias = torch.zeros(spec["out_features"]) if spec["bias"] else None
            return cls(rep, bias, in_channels=conv["in_channels"],
                       kernel_size=tuple(conv["kernel_size"]), stride=tuple(conv["stride"]),
                       padding=tuple(conv["padding"]), dilation=tuple(conv["dilation"]),
                       groups=conv["groups"])
        except ValueError as err:
            raise CheckpointError(f"{source}: layer {name!r}: {err}") from None

    def kernel(self) -> Tensor:
        """The decoded kernel ``[out, in/groups, kh, kw]``."""
        w = self._dense_weight()
        return w.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, self.kernel().to(x.dtype), bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def to_linear(self) -> nn.Linear:  # a kernel is no linear layer
        raise TypeError("a QuantizedConv2d decodes to an nn.Conv2d: use to_dense_module()")

    def to_dense_module(self) -> nn.Module:
        """An ``nn.Conv2d`` holding the decoded kernel (behind the input quantizer, if any)."""
        with torch.no_grad():
            w = self.kernel().detach()
            conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                             self.stride, self.padding, self.dilation, self.groups,
                             bias=self.bias is not None).to(device=w.device, dtype=w.dtype)
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv if self.input_quantizer is None else nn.Sequential(self.input_quantizer,
                                                                     conv)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")
