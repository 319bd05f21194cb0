"""Fine-tuning through discrete weights: the PV optimizer and its discrete-step strategies."""

from pvtune.optim import proximal  # noqa: F401  (registers the proximal_v strategy)
from pvtune.optim.pv import PVOptimizer, StepStats, continuous_parameters
from pvtune.optim.strategies import (
    STRATEGIES,
    VStepConfig,
    WeightState,
    register_strategy,
    top_groups,
    top_indices,
)

__all__ = [
    "STRATEGIES",
    "PVOptimizer",
    "StepStats",
    "VStepConfig",
    "WeightState",
    "continuous_parameters",
    "register_strategy",
    "top_groups",
    "top_indices",
]
