"""Round-to-nearest: the calibration-free initialisation of any representation."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pvtune.init.registry import register_init
from pvtune.reprs.base import QuantizedWeight, ReprConfig, representation_for


@dataclass(frozen=True)
class RTNConfig:
    """RTN has no settings of its own; the representation config says everything."""


@register_init("rtn", RTNConfig, (ReprConfig,), needs_calibration=False)
def rtn_init(
    weight: Tensor, xtx: Tensor | None, repr_config: ReprConfig, method_config: RTNConfig
) -> QuantizedWeight:
    """Each representation's own ``from_dense`` (nearest codes, no input statistics)."""
    return representation_for(repr_config).from_dense(weight, repr_config)
