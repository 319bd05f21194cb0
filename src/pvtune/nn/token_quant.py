"""Per-token asymmetric round-to-nearest quantization of activations, with straight-through
gradients (RoSTE, SpinQuant, QuaRot).

Each row of the last dimension (a token's activation vector, or one head of a token's key
or value) gets its own grid: with ``m = clip * max(max(x), 0)`` and
``l = clip * min(min(x), 0)``, the scale is ``s = (m - l) / (2^b - 1)``, the zero point
``z = round(-l / s)``, and ``Q(x) = s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)``. The
gradient of ``Q`` is taken to be the identity (no clipping mask), as in RoSTE.
:class:`TokenQuantizer` optionally rotates its input first (an :class:`OnlineRotation`, R4
on the down projection's input) and is saved with the layer that carries it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pvtune.errors import CheckpointError, ConfigError
from pvtune.nn.input_quantizers import register_input_quantizer
from pvtune.rotation.online import OnlineRotation


@dataclass(frozen=True)
class TokenQuantConfig:
    """``bits`` per value (2 to 16; 16 means no quantization) on a per-token asymmetric grid
    whose range is the token's own ``[min, max]`` times ``clip`` (0 < clip <= 1)."""

    bits: int = 4
    clip: float = 0.95

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) \
                or not 2 <= self.bits <= 16:
            raise ConfigError(f"TokenQuantConfig.bits must be an integer in [2, 16] (16: no "
                              f"quantization), got {self.bits!r}")
        if not (isinstance(self.clip, int | float) and 0 < self.clip <= 1):
            raise ConfigError(f"TokenQuantConfig.clip must be in (0, 1], got {self.clip!r}")

    @property
    def enabled(self) -> bool:
        """Whether values are quantized at all (16 bits: they are not)."""
        return self.bits < 16


def quantize_tokens(x: Tensor, bits: int, clip: float = 1.0) -> Tensor:
    """``Q(x)`` on a per-row asymmetric grid over the last dimension (module docstring), with
    the identity as its gradient."""
    with torch.no_grad():
        xf = x.detach().float()
        maxq = (1 << bits) - 1
        hi = xf.amax(-1, keepdim=True).clamp(min=0) * clip
        lo = xf.amin(-1, keepdim=True).clamp(max=0) * clip
        scale = (hi - lo) / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(xf / scale) + zero, 0, maxq)
        deq = ((q - zero) * scale).to(x.dtype)
    return deq + (x - x.detach())  # exactly the grid's values, the identity's gradient


@register_input_quantizer("per_token")
class TokenQuantizer(nn.Module):
    """A layer's input, rotated by ``rotation`` when given, then quantized per token by
    ``config``. While ``record`` is set, the mean squared quantization error it causes is
    accumulated in ``squared_error`` / ``count`` (rotation selection reads them)."""

    def __init__(self, config: TokenQuantConfig, rotation: OnlineRotation | None = None
                 ) -> None:
        super().__init__()
        if not isinstance(config, TokenQuantConfig):
            raise ConfigError(f"TokenQuantizer needs a TokenQuantConfig, got "
                              f"{type(config).__name__}")
        self.config = config
        self.rotation = rotation
        self.record = False
        self.squared_error = 0.0
        self.count = 0

    def forward(self, x: Tensor) -> Tensor:
        if self.rotation is not None:
            x = self.rotation(x)
        if not self.config.enabled:
            return x
        out = quantize_tokens(x, self.config.bits, self.config.clip)
        if self.record:
            with torch.no_grad():
                self.squared_error += float((out - x).double().pow(2).sum())
                self.count += x.numel()
        return out

    def to_spec(self) -> dict[str, Any]:
        """A checkpoint's record (the rotation's signs are in the state dict)."""
        rotation = None if self.rotation is None else {"size": self.rotation.size}
        return {**asdict(self.config), "rotation": rotation}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TokenQuantizer:
        """The quantizer a checkpoint record describes."""
        try:
            rotation = spec.get("rotation")
            return cls(TokenQuantConfig(bits=spec["bits"], clip=spec["clip"]),
                       None if rotation is None else OnlineRotation(int(rotation["size"])))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"bad per-token quantizer record {spec!r}: {err}") from None

    def extra_repr(self) -> str:
        return f"bits={self.config.bits}, clip={self.config.clip}"
