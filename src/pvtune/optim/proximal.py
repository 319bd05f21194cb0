"""JLCM's proximal mapping update: a discrete step for representations that hold one scalar
codebook per row (:class:`~pvtune.reprs.GroupedCodebookWeight`).

Read as a soft assignment ``W = sum_k a_k v_k`` over a row's levels ``v_k``, the gradient of
the loss with respect to ``a_k`` is ``g v_k``: steepest descent on the assignment favours
the extreme level in the gradient's direction, however far it is (what plain STE with a
large step does as well). JLCM weighs each candidate by a decreasing function of its
distance instead, so an index moves to a neighbour. Here a weight at level ``v_c`` with
normalised gradient ``d`` scores each other level ``v_k`` by

    s_k = -d * delta_k * exp(-|delta_k|),   delta_k = (v_k - v_c) / u

(``u`` the row's mean level spacing: the promised first-order decrease, damped by the
distance in units of that spacing); each weight's best candidate is its score, and the
``tau`` fraction of weights with the largest positive scores move. The step is one
candidate level, chosen by the score; ``tau`` sets how many weights move per step.
"""

from __future__ import annotations

import math

import torch

from pvtune.errors import ConfigError
from pvtune.optim.strategies import dense_direction, group_count, register_strategy, top_indices

ROWS_PER_CHUNK = 256  # rows scored at once: [rows, in, levels] temporaries stay bounded


def proximal_scores(levels, current, direction, unit):
    """Per weight, the best candidate's score and level (module docstring): ``levels``
    ``[out, K]``, ``current`` and ``direction`` ``[out, in]``, ``unit`` ``[out, 1]``."""
    score = torch.empty_like(current)
    target = torch.empty_like(current)
    for start in range(0, current.shape[0], ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        delta = (levels[rows, None, :] - current[rows, :, None]) / unit[rows, :, None]
        gain = -direction[rows, :, None] * delta * torch.exp(-delta.abs())
        gain = gain.masked_fill(delta.abs() < 1e-6, float("-inf"))  # the current level
        best, k = gain.max(-1)
        score[rows] = best
        target[rows] = levels[rows].gather(1, k)
    return score, target


def check_row_codebooks(rep) -> None:
    """A :class:`ConfigError` unless ``rep`` has one scalar codebook per row."""
    if getattr(rep, "row_levels", None) is None:
        raise ConfigError(f"the proximal_v strategy needs one scalar codebook per row "
                          f"(grouped_codebook: a JLCM-compressed model); "
                          f"{type(rep).__name__} has none")


@register_strategy("proximal_v", needs_buffer=False)
def proximal_v(rep, grad, state, config, generator) -> None:
    """JLCM's proximal mapping update (module docstring)."""
    check_row_codebooks(rep)
    with torch.no_grad():
        direction = dense_direction(state, grad, config)
        score, target = proximal_scores(rep.row_levels(), rep(), direction, rep.step_unit())
        flat = score.reshape(-1)
        chosen = top_indices(torch.nan_to_num(flat, neginf=0.0),
                             math.ceil(config.tau * group_count(rep)))
        chosen = chosen[flat[chosen] > 0]
        if chosen.numel():
            rep.encode_groups(chosen, target.reshape(-1)[chosen].unsqueeze(-1))


proximal_v.check = check_row_codebooks  # PVOptimizer refuses other representations up front
