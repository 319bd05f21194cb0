"""Discrete choices beyond weights: training through a codeword, a category, a token subset or
a permutation.

* :mod:`~pvtune.discrete.vq`: :class:`VectorQuantizer`, a VQ bottleneck (plain, EMA, rotation
  trick, VQBridge) with a codebook-usage metric;
* :mod:`~pvtune.discrete.gumbel`: a Gumbel-softmax straight-through layer with a temperature
  schedule (the estimator is :func:`pvtune.estimators.gumbel_softmax_st`);
* :mod:`~pvtune.discrete.topn`: :class:`TopNSelector`, learned top-n selection with a budget;
* :mod:`~pvtune.discrete.permutation`: weight matching and the straight-through learned
  permutation (Git Re-Basin), interpolation barriers, model merging.
"""

from pvtune.discrete.gumbel import GumbelSoftmaxST, TemperatureSchedule
from pvtune.discrete.permutation import (
    average,
    chain_of,
    interpolate,
    learn_permutation_ste,
    load_chain_,
    loss_barrier,
    permute_chain,
    relu_chain_forward,
    weight_matching,
)
from pvtune.discrete.topn import (
    Selection,
    TopNConfig,
    TopNSelector,
    budget_loss,
    gather_kept,
    hard_topn_mask,
    soft_threshold_gate,
)
from pvtune.discrete.vq import (
    CodebookUsage,
    VectorQuantizer,
    VQBottleneckConfig,
    VQBridge,
    VQOutput,
    learning_annealing,
    rotate_to,
)

__all__ = [
    "CodebookUsage", "GumbelSoftmaxST", "Selection", "TemperatureSchedule", "TopNConfig",
    "TopNSelector", "VQBottleneckConfig", "VQBridge", "VQOutput", "VectorQuantizer", "average",
    "budget_loss", "chain_of", "gather_kept", "hard_topn_mask",
    "interpolate", "learn_permutation_ste", "learning_annealing", "load_chain_", "loss_barrier",
    "permute_chain", "relu_chain_forward", "rotate_to", "soft_threshold_gate",
    "weight_matching",
]
