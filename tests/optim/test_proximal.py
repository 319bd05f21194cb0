"""JLCM's proximal mapping update moves an index to the adjacent level where plain STE with
a large step jumps to a far one, and only once its buffer has passed the midpoint; on a
grouped-codebook layer PV-Tuning and every strategy lower a regression loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pvtune.errors import ConfigError
from pvtune.nn import QuantizedLinear
from pvtune.optim import PVOptimizer, VStepConfig
from pvtune.optim.proximal import proximal_scores
from pvtune.optim.strategies import (
    STRATEGIES,
    WeightState,
    group_count,
    move_buffer,
    top_indices,
)
from pvtune.reprs import GroupedCodebookConfig, GroupedCodebookWeight, UniformConfig
from pvtune.reprs.uniform import UniformWeight


def one_row() -> GroupedCodebookWeight:
    rep = GroupedCodebookWeight(1, 4, GroupedCodebookConfig(bits=2, groups=1))
    with torch.no_grad():
        rep.codebooks.copy_(torch.tensor([[0.0, 1.0, 2.0, 3.0]]))
        rep.codes.zero_()  # every weight at level 0.0
    return rep


def test_the_proximal_step_moves_to_the_neighbour_where_ste_jumps():
    grad = torch.tensor([[-50.0, 0.0, 0.0, 0.0]])  # a strong pull upwards on weight 0
    ste = one_row()
    STRATEGIES.get("ste")(ste, grad, WeightState(ste, True), VStepConfig("ste", lr=3.0),
                          torch.Generator())
    assert ste().tolist()[0][0] == 3.0  # the buffer lands past every level: a far jump
    prox = one_row()
    STRATEGIES.get("proximal_v")(prox, grad, WeightState(prox, True),
                                 VStepConfig("proximal_v", lr=3.0, tau=0.25),
                                 torch.Generator())
    assert prox().tolist()[0] == [1.0, 0.0, 0.0, 0.0]  # the adjacent level, nothing else


def test_scores_follow_the_formula():
    levels = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    unit = torch.tensor([1.0])
    score, target = proximal_scores(levels, torch.tensor([0.0]), torch.tensor([3.0]), unit)
    # every level above is nearer to the buffer at 3: r * delta * exp(-delta) is 3/e for the
    # adjacent one, 6/e^2 and 9/e^3 for the others
    assert target.item() == 1.0 and score.item() == pytest.approx(3 * math.exp(-1))
    score, target = proximal_scores(levels, torch.tensor([1.0]), torch.tensor([1.0]), unit)
    # a buffer at 2 is as near to level 3 as to level 1 (the current): only level 2 is nearer
    assert target.item() == 2.0 and score.item() == pytest.approx(math.exp(-1))
    score, _ = proximal_scores(levels.expand(2, -1), torch.tensor([1.0, 1.0]),
                               torch.tensor([0.4, -0.5]), unit.expand(2))
    assert score.tolist() == [-math.inf, -math.inf]  # no level nearer to the buffer


def test_a_code_moves_once_the_buffer_passes_the_midpoint():
    rep = one_row()
    state, config = WeightState(rep, True), VStepConfig("proximal_v", lr=0.12, tau=0.25)
    grad = torch.tensor([[-1.0, 0.0, 0.0, 0.0]])  # the same pull every step: d = -1
    step = STRATEGIES.get("proximal_v")
    for _ in range(4):  # the buffer at 0.48 of the spacing: still nearer to level 0
        assert step(rep, grad, state, config, torch.Generator()) == 0
    assert rep().tolist()[0] == [0.0, 0.0, 0.0, 0.0]
    assert step(rep, grad, state, config, torch.Generator()) == 1  # 0.6: past the midpoint
    assert rep().tolist()[0] == [1.0, 0.0, 0.0, 0.0]


def test_a_representation_without_row_codebooks_is_refused_before_any_step():
    rep = UniformWeight.from_dense(torch.randn(4, 8), UniformConfig(bits=2, group_size=8))
    with pytest.raises(ConfigError, match="one scalar codebook per row"):
        STRATEGIES.get("proximal_v")(rep, torch.randn(4, 8), WeightState(rep, False),
                                     VStepConfig("proximal_v"), torch.Generator())
    layer = QuantizedLinear(rep)
    with pytest.raises(ConfigError, match="JLCM-compressed"):
        PVOptimizer(layer, torch.optim.Adam(layer.parameters()), VStepConfig("proximal_v"))


@pytest.mark.parametrize("strategy", ["subspace_v_ste", "ste", "stochastic_rounding",
                                      "proximal_v", "linearized_v", "subspace_v", "frozen"])
def test_every_strategy_lowers_the_loss_on_grouped_codebooks(strategy):
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(24, 32, generator=gen)
    x = torch.randn(256, 32, generator=gen)
    start = teacher + 0.3 * torch.randn(24, 32, generator=gen)
    layer = QuantizedLinear(GroupedCodebookWeight.from_dense(
        start, GroupedCodebookConfig(bits=3, groups=4)))
    opt = PVOptimizer(layer, torch.optim.Adam(layer.parameters(), lr=1e-3),
                      VStepConfig(strategy, tau=0.05))  # each strategy's default step

    def loss() -> torch.Tensor:
        return (layer(x) - x @ teacher.T).pow(2).mean()

    before = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.99 * before


def test_the_proximal_scores_do_not_change_when_the_weights_are_rescaled():
    gen = torch.Generator().manual_seed(1)
    levels = torch.randn(15, 4, generator=gen).sort(-1).values
    current = levels.gather(1, torch.randint(0, 4, (15, 1), generator=gen)).squeeze(1)
    displacement = 2 * torch.randn(15, generator=gen)
    unit = (levels[:, -1] - levels[:, 0]) / 3
    score, target = proximal_scores(levels, current, displacement, unit)
    score8, target8 = proximal_scores(levels / 8, current / 8, displacement, unit / 8)
    torch.testing.assert_close(score8, score)
    torch.testing.assert_close(target8, target / 8)


def score_every_weight(rep, grad, state, config) -> int:
    """proximal_v without skipping the weights inside the change threshold."""
    move_buffer(rep, state, grad, config)
    with torch.no_grad():
        w = rep()
        unit = rep.step_unit().expand_as(w).reshape(-1)
        levels = rep.row_levels().repeat_interleave(w.shape[1], 0)
        score, target = proximal_scores(levels, w.reshape(-1),
                                        (state.buffer - w).reshape(-1) / unit, unit)
        chosen = top_indices(torch.nan_to_num(score, neginf=0.0),
                             math.ceil(config.tau * group_count(rep)))
        rep.encode_groups(chosen, target[chosen].unsqueeze(-1))
        return int(chosen.numel())


def test_skipping_weights_inside_the_change_threshold_changes_no_decision():
    gen = torch.Generator().manual_seed(2)
    start = GroupedCodebookWeight.from_dense(torch.randn(12, 40, generator=gen),
                                             GroupedCodebookConfig(bits=3, groups=3))
    fast, full = copy.deepcopy(start), copy.deepcopy(start)
    config = VStepConfig("proximal_v", lr=0.2, tau=0.05)
    states = WeightState(fast, True), WeightState(full, True)
    moved = 0
    for _ in range(8):
        grad = torch.randn(12, 40, generator=gen)
        n = STRATEGIES.get("proximal_v")(fast, grad, states[0], config, torch.Generator())
        assert n == score_every_weight(full, grad, states[1], config)
        assert torch.equal(fast.codes, full.codes)
        moved += n
    assert moved > 0  # the steps did move codes
