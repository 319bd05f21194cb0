"""Flip counts, SAD and ReSTE's indicators on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pvtune.nn import quantize_
from pvtune.qat import FlipTracker, QATConfig, layer_bits, reste_layer_indicators
from pvtune.reprs import BinaryConfig, NMSparseConfig, TernaryConfig


def one_layer(config: QATConfig, weight: torch.Tensor) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        net[0].weight.copy_(weight)
    return quantize_(net, config)


def test_sign_flips_are_counted():
    net = one_layer(QATConfig(BinaryConfig()), torch.tensor([[1.0, -1.0, 2.0, -2.0]]))
    tracker = FlipTracker(net)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[-1.0, -1.0, 2.0, 3.0]]))  # two signs flip
    report = tracker.update()
    assert (report["changed"], report["total"], report["fraction"]) == (2, 4, 0.5)
    assert report["sad"] == 0  # no N:M layer
    assert tracker.update()["changed"] == 0  # counted since the last update only


def test_nm_mask_change_counts_two_for_a_swap():
    w = torch.tensor([[4.0, 3.0, 1.0, 0.5, 1.0, 2.0, 3.0, 4.0]])
    net = one_layer(QATConfig(NMSparseConfig(2, 4), "sr_ste"), w)
    tracker = FlipTracker(net)
    with torch.no_grad():
        net[0].weight[0, 2] = 3.5  # block 1: position 2 replaces position 1
    report = tracker.update()
    assert report["sad"] == 2 and report["changed"] == 2


def test_ternary_level_changes_are_counted():
    net = one_layer(QATConfig(TernaryConfig()), torch.tensor([[1.0, -1.0, 0.0, 2.0]]))
    tracker = FlipTracker(net)
    with torch.no_grad():
        net[0].weight[0, 2] = 1.0  # 0 -> +1 (gamma grows but the others keep their level)
    assert tracker.update()["changed"] == 1


def test_reste_indicators_follow_their_definition():
    w = torch.tensor([[0.5, -2.0, 1.0, 0.1]])
    net = one_layer(QATConfig(BinaryConfig(), "reste"), w)
    net[0].set_progress(1.0)  # o = 3
    net(torch.ones(1, 4)).sum().backward()
    got = reste_layer_indicators(net)["0"]
    alpha = float(w.abs().mean().half())
    u = w / alpha
    f = torch.sign(u) * u.abs().pow(1 / 3)
    assert got["o"] == pytest.approx(3.0)
    assert got["estimating_error"] == pytest.approx(float((f - torch.sign(u)).norm()), rel=1e-5)
    assert got["gradient_stability"] == pytest.approx(float(net[0].weight.grad.abs().var()))
    assert math.isfinite(got["gradient_stability"])


def test_layer_bits_are_the_representation_cost():
    net = one_layer(QATConfig(BinaryConfig(group_size=4)), torch.randn(2, 8))
    assert layer_bits(net) == {"0": 1 + 16 / 4}
