"""Learned top-n: exactly n kept in original order at inference, a differentiable gate in
training whose soft part sums to rho * M, and a budget loss that reaches rho."""

from __future__ import annotations

import pytest
import torch

from pvtune.discrete import (
    TopNConfig,
    TopNSelector,
    budget_loss,
    gather_kept,
    hard_topn_mask,
    soft_threshold_gate,
)
from pvtune.errors import ConfigError


def _selector(**kw) -> TopNSelector:
    torch.manual_seed(0)
    return TopNSelector(TopNConfig(dim=6, query_dim=3, score_dim=8, **kw))


def test_hard_mask_keeps_exactly_n_highest():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, -1.0], [3.0, 2.0, 1.0, 0.0, -1.0]])
    mask = hard_topn_mask(scores, torch.tensor([2, 4]))
    assert mask.tolist() == [[0, 1, 0, 1, 0], [1, 1, 1, 1, 0]]


def test_inference_keeps_n_tokens_in_their_original_order():
    sel = _selector().eval()
    tokens = torch.randn(4, 12, 6)
    query = torch.randn(4, 3)
    out = sel(tokens, query)
    assert torch.equal(out.mask.sum(-1).long(), out.counts)
    assert torch.equal(out.counts, torch.ceil(out.keep_ratio * 12 - 1e-6).clamp(1, 12).long())
    kept, valid = gather_kept(tokens, out.mask)
    for b in range(4):
        n = int(out.counts[b])
        top = out.scores[b].topk(n).indices.sort().values  # positions of the n best, in order
        assert int(valid[b].sum()) == n
        torch.testing.assert_close(kept[b, :n], tokens[b, top])
        assert bool((kept[b, n:] == 0).all())


def test_soft_gate_sums_to_the_target_and_is_differentiable():
    torch.manual_seed(1)
    scores = torch.randn(3, 20, requires_grad=True)
    target = torch.tensor([2.0, 7.5, 15.0], requires_grad=True)
    gate = soft_threshold_gate(scores, target, tau=0.3)
    torch.testing.assert_close(gate.sum(-1), target.detach(), atol=1e-4, rtol=0)
    gate.sum().backward()
    # the row sums equal the target, so d(sum)/d(target) = 1 and d(sum)/d(scores) = 0
    torch.testing.assert_close(target.grad, torch.ones(3), atol=1e-3, rtol=0)
    assert scores.grad.abs().max() < 1e-3
    scores.grad = None
    (soft_threshold_gate(scores, target.detach(), 0.3)[:, 0]).sum().backward()
    assert bool((scores.grad[:, 0] > 0).all()) and bool((scores.grad[:, 1:] <= 1e-6).all())


def test_training_mask_is_hard_forward_and_carries_gradient():
    sel = _selector().train()
    tokens = torch.randn(5, 16, 6)
    query = torch.randn(5, 3)
    out = sel(tokens, query)
    assert set(out.mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out.mask.detach().sum(-1).long(), out.counts)
    (out.mask * torch.randn(5, 16)).sum().backward()
    assert sel.key.weight.grad.abs().sum() > 0 and sel.ratio[0].weight.grad.abs().sum() > 0


def test_budget_loss_pulls_the_ratio_to_its_minimum():
    sel = _selector(rho_min=0.1, rho_max=0.9)
    opt = torch.optim.Adam(sel.parameters(), lr=0.05)
    tokens, query = torch.randn(8, 10, 6), torch.randn(8, 3)
    for _ in range(200):
        loss = budget_loss(sel(tokens, query).keep_ratio)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rho = sel(tokens, query).keep_ratio.detach()
    assert float(rho.max()) < 0.12 and float(rho.min()) >= 0.1


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="rho_min"):
        TopNConfig(4, 4, rho_min=0.5, rho_max=0.2)
    with pytest.raises(ConfigError, match="tokens must be"):
        _selector()(torch.randn(2, 5, 4), torch.randn(2, 3))
