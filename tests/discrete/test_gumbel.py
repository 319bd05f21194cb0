"""Gumbel-softmax straight-through: hard one-hot forward, tempered softmax gradient backward,
correct sampling frequencies, temperature schedules."""

from __future__ import annotations

import pytest
import torch

from pvtune.discrete import GumbelSoftmaxST, TemperatureSchedule
from pvtune.errors import ConfigError
from pvtune.estimators import gumbel_softmax_st, hard_forward


def test_forward_is_the_hard_argmax_and_backward_the_soft_gradient():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, requires_grad=True)
    noise = torch.randn(5, 7)
    tau = 0.7
    y = gumbel_softmax_st(logits, tau, gumbel=noise)
    hard = torch.nn.functional.one_hot((logits + noise).argmax(-1), 7).float()
    assert torch.equal(y.detach(), hard)
    g = torch.randn(5, 7)
    (y * g).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    (torch.softmax((ref_logits + noise) / tau, -1) * g).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_samples_follow_the_categorical_distribution():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    draws = gumbel_softmax_st(logits.expand(40_000, 3), 1.0, generator=gen)
    freq = draws.mean(0)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.01, rtol=0)


def test_soft_mode_returns_the_relaxed_sample():
    logits = torch.randn(4, 3)
    layer = GumbelSoftmaxST(TemperatureSchedule(2.0, 2.0), hard=False).eval()
    torch.testing.assert_close(layer(logits), torch.softmax(logits / 2.0, -1))


def test_hard_forward_is_exact_and_passes_the_gradient():
    soft = torch.softmax(torch.randn(4, 5), -1).requires_grad_(True)
    hard = torch.nn.functional.one_hot(soft.argmax(-1), 5).float()
    y = hard_forward(hard, soft)
    assert torch.equal(y, hard)
    g = torch.randn(4, 5)
    (y * g).sum().backward()
    assert torch.equal(soft.grad, g)


def test_schedule_and_layer_anneal_the_temperature():
    sched = TemperatureSchedule(start=1.0, end=0.01, steps=4)
    assert [round(sched(s), 6) for s in range(6)] == [1.0, 0.316228, 0.1, 0.031623, 0.01, 0.01]
    lin = TemperatureSchedule(2.0, 1.0, 2, kind="linear")
    assert [lin(s) for s in range(3)] == [2.0, 1.5, 1.0]
    layer = GumbelSoftmaxST(sched)
    assert layer.tau == 1.0
    layer.step()
    assert layer.tau == pytest.approx(0.316228, abs=1e-6)
    logits = torch.randn(3, 5)
    out = layer.eval()(logits)  # eval: the noiseless argmax
    assert torch.equal(out, torch.nn.functional.one_hot(logits.argmax(-1), 5).float())


def test_bad_temperatures_are_refused():
    with pytest.raises(ValueError, match="tau must be > 0"):
        gumbel_softmax_st(torch.zeros(2, 2), 0.0)
    with pytest.raises(ConfigError, match="temperatures must be > 0"):
        TemperatureSchedule(start=0.0)
