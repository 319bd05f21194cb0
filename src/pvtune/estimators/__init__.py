"""Gradient estimators for discrete forward maps, each a named autograd function.

Look one up by name with :func:`get_estimator`; add your own with :func:`register_estimator`.
"""

from pvtune.estimators.lsq import LearnedStepQuantize, lsq
from pvtune.estimators.registry import (
    ESTIMATORS,
    get_estimator,
    list_estimators,
    register_estimator,
)
from pvtune.estimators.sr_ste import SparseRefinedStraightThrough, nm_mask, sr_ste
from pvtune.estimators.stochastic import (
    GumbelSoftmaxStraightThrough,
    StochasticRound,
    gumbel_softmax_st,
    sample_gumbel,
    stochastic_rounding,
)
from pvtune.estimators.straight_through import (
    ApproxSign,
    ClippedStraightThrough,
    HardForward,
    RectifiedStraightThrough,
    StraightThrough,
    approx_sign,
    binary_sign,
    clipped_ste,
    hard_forward,
    reste,
    reste_indicators,
    reste_schedule,
    ste,
)

__all__ = [
    "ESTIMATORS",
    "ApproxSign",
    "ClippedStraightThrough",
    "GumbelSoftmaxStraightThrough",
    "HardForward",
    "LearnedStepQuantize",
    "RectifiedStraightThrough",
    "SparseRefinedStraightThrough",
    "StochasticRound",
    "StraightThrough",
    "approx_sign",
    "binary_sign",
    "clipped_ste",
    "get_estimator",
    "gumbel_softmax_st",
    "hard_forward",
    "list_estimators",
    "lsq",
    "nm_mask",
    "register_estimator",
    "reste",
    "reste_indicators",
    "reste_schedule",
    "sample_gumbel",
    "sr_ste",
    "ste",
    "stochastic_rounding",
]
