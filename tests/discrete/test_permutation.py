"""Permutation alignment: weight matching recovers a known permutation exactly, permuting a
chain keeps its function, barriers and merging behave as defined."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pvtune.discrete import (
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
from pvtune.errors import ConfigError


def _chain(sizes=(20, 16, 12, 16, 5), seed=0):
    torch.manual_seed(seed)
    return chain_of([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)])


def _random_perms(chain, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(w.shape[0], generator=g) for w, _ in chain[:-1]]


def test_permuting_a_chain_keeps_its_function():
    chain = _chain()
    x = torch.randn(7, 20)
    permuted = permute_chain(chain, _random_perms(chain))
    torch.testing.assert_close(relu_chain_forward(permuted, x), relu_chain_forward(chain, x))
    assert not torch.equal(permuted[0][0], chain[0][0])


def test_weight_matching_recovers_a_known_permutation_exactly():
    chain = _chain()
    perms = _random_perms(chain)
    shuffled = permute_chain(chain, perms)
    found = weight_matching(chain, shuffled)
    aligned = permute_chain(shuffled, found)
    for (wa, ba), (wb, bb) in zip(chain, aligned, strict=True):
        assert torch.equal(wa, wb) and torch.equal(ba, bb)
    inverse = [torch.argsort(p) for p in perms]
    assert all(torch.equal(f, i) for f, i in zip(found, inverse, strict=True))


def test_weight_matching_from_a_given_start_keeps_an_optimum():
    chain = _chain()
    perms = _random_perms(chain)
    shuffled = permute_chain(chain, perms)
    inverse = [torch.argsort(p) for p in perms]
    found = weight_matching(chain, shuffled, init=inverse, max_iter=1)
    assert all(torch.equal(f, i) for f, i in zip(found, inverse, strict=True))


def test_weight_matching_brings_a_noisy_copy_closer():
    chain = _chain()
    noisy = [(w + 0.05 * torch.randn_like(w), b) for w, b in chain]
    shuffled = permute_chain(noisy, _random_perms(chain, 3))
    aligned = permute_chain(shuffled, weight_matching(chain, shuffled))
    dist = sum(float((wa - wb).norm()) for (wa, _), (wb, _) in zip(chain, aligned, strict=True))
    before = sum(float((wa - wb).norm()) for (wa, _), (wb, _) in zip(chain, shuffled,
                                                                      strict=True))
    assert dist < 0.3 * before


def test_ste_permutation_finds_the_permutation_of_a_shuffled_copy():
    chain = _chain(sizes=(8, 6, 6, 3))
    shuffled = permute_chain(chain, _random_perms(chain, 5))
    x = torch.randn(64, 8)
    y = relu_chain_forward(chain, x).argmax(-1)

    def loss(c):
        return nn.functional.cross_entropy(relu_chain_forward(c, x), y)

    perms = learn_permutation_ste(chain, shuffled, loss, steps=5, lr=1e-3)
    aligned = permute_chain(shuffled, perms)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(chain, aligned, strict=True))


def test_interpolation_average_and_barrier():
    a, b = _chain(seed=0), _chain(seed=1)
    mid = interpolate(a, b, 0.5)
    torch.testing.assert_close(mid[1][0], (a[1][0] + b[1][0]) / 2)
    torch.testing.assert_close(average([a, b])[2][1], mid[2][1])
    assert loss_barrier([1.0, 2.0, 3.0]) == pytest.approx(0.0)
    assert loss_barrier([1.0, 3.0, 1.0]) == pytest.approx(2.0)
    assert loss_barrier([0.0, 1.5, 2.0, 3.0, 2.0]) == pytest.approx(1.5)


def test_load_chain_writes_back_into_layers():
    layers = [nn.Linear(4, 3), nn.Linear(3, 2)]
    chain = _chain(sizes=(4, 3, 2), seed=9)
    load_chain_(layers, chain)
    assert torch.equal(layers[1].weight, chain[1][0])


def test_mismatched_networks_are_refused():
    with pytest.raises(ConfigError, match="layers"):
        weight_matching(_chain(), _chain(sizes=(20, 16, 5)))
    chain = _chain()
    with pytest.raises(ConfigError, match="not a permutation"):
        permute_chain(chain, [torch.zeros(16, dtype=torch.long), torch.arange(12),
                              torch.arange(16)])
