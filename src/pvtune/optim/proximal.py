"""JLCM's proximal mapping update: a discrete step for representations that hold one scalar
codebook per row (:class:`~pvtune.reprs.GroupedCodebookWeight`).

Read as a soft assignment ``W = sum_k a_k v_k`` over a row's levels ``v_k``, the gradient of
the loss with respect to ``a_k`` is ``g v_k``: steepest descent on the assignment favours
the extreme level in the gradient's direction, however far it is (what plain STE with a
large step does as well). JLCM weighs each candidate by a decreasing function of its
distance instead, so an index moves to a neighbour.

Here the step keeps STE's dense buffer ``y`` (moved by ``lr * d * u`` each step, ``d`` the
Adam direction, ``u`` the row's mean level spacing), so a code moves only once the gradients
have pushed the buffer past the midpoint to another level, as a learned mapping would after
enough steps of its learning rate. A weight at level ``v_c`` with buffer displacement
``r = (y - W) / u`` scores each other level ``v_k`` by

    s_k = r * delta_k * exp(-|delta_k|),   delta_k = (v_k - v_c) / u

(the decrease of ``||y - W||^2`` promised to first order, damped by the distance in units of
the spacing), among the levels nearer to ``y`` than ``v_c`` is; each weight's best candidate
is its score, and at most the ``tau`` fraction of weights with the largest positive scores
move. Plain STE re-encodes a weight to the level nearest its buffer, however far; this step
moves it to the best-scored level, which favours the adjacent one.
"""

from __future__ import annotations

import math

import torch

from pvtune.errors import ConfigError
from pvtune.optim.strategies import group_count, move_buffer, register_strategy, top_indices

CHUNK = 1 << 16  # weights scored at once: [chunk, levels] temporaries stay bounded


def proximal_scores(levels, current, displacement, unit):
    """Per weight, the best candidate's score and level (module docstring): ``levels``
    ``[n, K]`` the levels of each weight's row, ``current`` ``[n]`` its level and ``unit``
    ``[n]`` its row's level spacing, in weight units; ``displacement`` ``[n]`` the buffer's
    offset from ``current`` in units of ``unit``. A weight with no level nearer to its
    buffer scores ``-inf``."""
    score = torch.empty_like(current)
    target = torch.empty_like(current)
    for start in range(0, current.shape[0], CHUNK):
        at = slice(start, start + CHUNK)
        delta = (levels[at] - current[at, None]) / unit[at, None]
        r = displacement[at, None]
        gain = r * delta * torch.exp(-delta.abs())
        # the current level, and levels no nearer to the buffer (|r - delta| >= |r|)
        out = (delta * (2 * r - delta) <= 0) | (delta.abs() < 1e-6)
        best, k = gain.masked_fill_(out, float("-inf")).max(-1)
        score[at] = best
        target[at] = levels[at].gather(1, k[:, None]).squeeze(1)
    return score, target


def check_row_codebooks(rep) -> None:
    """A :class:`ConfigError` unless ``rep`` has one scalar codebook per row."""
    if getattr(rep, "row_levels", None) is None:
        raise ConfigError(f"the proximal_v strategy needs one scalar codebook per row "
                          f"(grouped_codebook: a JLCM-compressed model); "
                          f"{type(rep).__name__} has none")


@register_strategy("proximal_v", needs_buffer=True, counts_changes=True)
def proximal_v(rep, grad, state, config, generator) -> int:
    """JLCM's proximal mapping update (module docstring); returns the number of weights
    whose index changed."""
    check_row_codebooks(rep)
    move_buffer(rep, state, grad, config)
    with torch.no_grad():
        w = rep()
        # only weights whose buffer lies at least the change threshold from their level can
        # have a level nearer to it than their own
        gap = torch.sub(state.buffer, w)
        index = (gap.abs() >= rep.change_threshold()).view(-1).nonzero().squeeze(1)
        if index.numel() == 0:
            return 0
        rows = index // w.shape[1]
        unit = rep.step_unit().view(-1)[rows]
        score, target = proximal_scores(rep.row_levels().index_select(0, rows),
                                        w.view(-1)[index], gap.view(-1)[index] / unit, unit)
        del gap
        budget = math.ceil(config.tau * group_count(rep))
        chosen = top_indices(torch.nan_to_num(score, neginf=0.0), budget)
        if chosen.numel():
            rep.encode_groups(index[chosen], target[chosen].unsqueeze(-1))
        return int(chosen.numel())


proximal_v.check = check_row_codebooks  # PVOptimizer refuses other representations up front
