"""Permutation symmetry of layer chains: align one network's hidden units to another's.

A chain is a list of ``(weight [out, in], bias [out])`` pairs, each layer feeding the next
through an elementwise activation (an MLP). Permuting the outputs of layer ``i`` and the
inputs of layer ``i + 1`` together leaves the function unchanged, so two networks trained
from different seeds can be compared, interpolated or merged only after aligning them.

* :func:`weight_matching`: Git Re-Basin's coordinate descent, one linear assignment
  (``scipy.optimize.linear_sum_assignment``) per hidden layer, until no permutation changes.
* :func:`learn_permutation_ste`: Git Re-Basin's straight-through estimator: a free copy of the
  weights is trained so that the midpoint between model A and the *hard* permutation of
  model B nearest to that copy has low loss; the gradient reaches the copy straight through.
* :func:`interpolate` / :func:`loss_barrier`: the loss along the line between two models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from pvtune.errors import ConfigError

Chain = list[tuple[Tensor, Tensor]]


def chain_of(layers: Sequence[nn.Linear]) -> Chain:
    """The ``(weight, bias)`` pairs of ``layers`` (detached copies)."""
    return [(layer.weight.detach().clone(), layer.bias.detach().clone()) for layer in layers]


def load_chain_(layers: Sequence[nn.Linear], chain: Chain) -> None:
    """Copy ``chain``'s weights into ``layers`` in place."""
    _check_pair(chain_of(layers), chain)
    with torch.no_grad():
        for layer, (w, b) in zip(layers, chain, strict=True):
            layer.weight.copy_(w)
            layer.bias.copy_(b)


def relu_chain_forward(chain: Chain, x: Tensor) -> Tensor:
    """The MLP a chain describes: ReLU between layers, none after the last."""
    h = x.flatten(1)
    for i, (w, b) in enumerate(chain):
        h = torch.nn.functional.linear(h, w, b)
        if i < len(chain) - 1:
            h = h.relu()
    return h


def permute_chain(chain: Chain, perms: Sequence[Tensor]) -> Chain:
    """``chain`` with the outputs of layer ``i`` reordered by ``perms[i]`` (new unit ``j`` is
    old unit ``perms[i][j]``) and the next layer's inputs to match; the function is the same.
    ``perms`` has one entry per hidden layer (``len(chain) - 1``)."""
    _check_perms(chain, perms)
    out = []
    for i, (w, b) in enumerate(chain):
        if i > 0:
            w = w[:, perms[i - 1]]
        if i < len(chain) - 1:
            w, b = w[perms[i]], b[perms[i]]
        out.append((w, b))
    return out


def weight_matching(target: Chain, source: Chain, *, max_iter: int = 100, seed: int = 0,
                    init: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Permutations that make ``permute_chain(source, perms)`` as close as possible to
    ``target`` in the sum of inner products of all weights and biases (Git Re-Basin's weight
    matching: coordinate descent over hidden layers in random order, each a linear
    assignment, until a full pass changes nothing). ``init`` starts the descent from given
    permutations (the identity otherwise)."""
    _check_pair(target, source)
    widths = [w.shape[0] for w, _ in target[:-1]]
    if init is not None:
        _check_perms(source, init)
        perms = [p.clone() for p in init]
    else:
        perms = [torch.arange(n) for n in widths]
    rng = np.random.default_rng(seed)
    a = [(w.detach().double(), b.detach().double()) for w, b in target]
    s = [(w.detach().double(), b.detach().double()) for w, b in source]
    for _ in range(max_iter):
        changed = False
        for layer in rng.permutation(len(widths)):
            cost = _assignment_gain(a, s, perms, int(layer))
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            if not torch.equal(new, perms[layer]):
                old_gain = cost[torch.arange(len(new)), perms[layer]].sum()
                new_gain = cost[torch.arange(len(new)), new].sum()
                if new_gain > old_gain + 1e-12 * abs(float(old_gain)):
                    perms[layer] = new
                    changed = True
        if not changed:
            break
    return perms


def _assignment_gain(a: Chain, s: Chain, perms: list[Tensor], layer: int) -> Tensor:
    """``gain[j, k]``: inner product gained by mapping source unit ``k`` to target unit ``j``
    of hidden layer ``layer``, with every other permutation held fixed."""
    w_a, b_a = a[layer]
    w_s, b_s = s[layer]
    if layer > 0:
        w_s = w_s[:, perms[layer - 1]]
    gain = w_a @ w_s.t() + torch.outer(b_a, b_s)
    w_next_a = a[layer + 1][0]
    w_next_s = s[layer + 1][0]
    if layer + 1 < len(perms):
        w_next_s = w_next_s[perms[layer + 1]]
    return gain + w_next_a.t() @ w_next_s


def interpolate(a: Chain, b: Chain, alpha: float) -> Chain:
    """``(1 - alpha) a + alpha b``, layer by layer."""
    _check_pair(a, b)
    return [((1 - alpha) * wa + alpha * wb, (1 - alpha) * ba + alpha * bb)
            for (wa, ba), (wb, bb) in zip(a, b, strict=True)]


def average(chains: Sequence[Chain]) -> Chain:
    """The mean of several chains of the same shapes (model merging)."""
    if not chains:
        raise ConfigError("average needs at least one chain")
    for c in chains[1:]:
        _check_pair(chains[0], c)
    n = len(chains)
    return [(sum(c[i][0] for c in chains) / n, sum(c[i][1] for c in chains) / n)
            for i in range(len(chains[0]))]


def loss_barrier(values: Sequence[float]) -> float:
    """The barrier of a curve sampled at evenly spaced ``alpha`` from 0 to 1: the largest
    excess of the curve over the straight line between its end points."""
    if len(values) < 2:
        raise ConfigError("a barrier needs the curve at >= 2 points")
    v = np.asarray(values, dtype=np.float64)
    alphas = np.linspace(0.0, 1.0, len(v))
    return float(np.max(v - ((1 - alphas) * v[0] + alphas * v[-1])))


def learn_permutation_ste(target: Chain, source: Chain, loss: Callable[[Chain], Tensor],
                          steps: int, *, lr: float = 1e-3, batches: Iterable | None = None,
                          seed: int = 0, progress: Callable[[int, float], None] | None = None
                          ) -> list[Tensor]:
    """Git Re-Basin's straight-through estimator for the permutation aligning ``source`` to
    ``target``.

    A free copy ``theta`` of the weights starts at ``target``. Each step projects it onto the
    nearest permutation of ``source`` (:func:`weight_matching`), forms the midpoint between
    ``target`` and that hard permutation, whose gradient flows straight through to ``theta``,
    and takes an Adam step on ``loss(midpoint)`` (``loss`` samples its own batch, or takes
    the next of ``batches`` as its second argument). Returns the permutations of the last
    projection."""
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    _check_pair(target, source)
    theta = [(w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True))
             for w, b in target]
    opt = torch.optim.Adam([p for pair in theta for p in pair], lr=lr)
    batch_iter = iter(batches) if batches is not None else None
    perms = weight_matching(target, source, seed=seed)
    for step in range(steps):
        # theta moves little per step: the last projection is a close start
        perms = weight_matching([(w.detach(), b.detach()) for w, b in theta], source,
                                seed=seed + step, init=perms)
        hard = permute_chain(source, perms)
        through = [(wt + (wh - wt).detach(), bt + (bh - bt).detach())
                   for (wt, bt), (wh, bh) in zip(theta, hard, strict=True)]
        mid = interpolate(target, through, 0.5)
        value = loss(mid) if batch_iter is None else loss(mid, next(batch_iter))
        opt.zero_grad()
        value.backward()
        opt.step()
        if progress is not None:
            progress(step, float(value))
    return weight_matching([(w.detach(), b.detach()) for w, b in theta], source, seed=seed,
                           init=perms)


def _check_pair(a: Chain, b: Chain) -> None:
    if len(a) != len(b):
        raise ConfigError(f"the two networks have {len(a)} and {len(b)} layers")
    for i, ((wa, ba), (wb, bb)) in enumerate(zip(a, b, strict=True)):
        if wa.shape != wb.shape or ba.shape != bb.shape:
            raise ConfigError(f"layer {i} differs in shape: {list(wa.shape)} vs "
                              f"{list(wb.shape)}")
    for i in range(len(a) - 1):
        if a[i][0].shape[0] != a[i + 1][0].shape[1]:
            raise ConfigError(f"layer {i} has {a[i][0].shape[0]} outputs but layer {i + 1} "
                              f"takes {a[i + 1][0].shape[1]} inputs: not a chain")


def _check_perms(chain: Chain, perms: Sequence[Tensor]) -> None:
    if len(perms) != len(chain) - 1:
        raise ConfigError(f"a chain of {len(chain)} layers has {len(chain) - 1} hidden "
                          f"layers, got {len(perms)} permutations")
    for i, p in enumerate(perms):
        n = chain[i][0].shape[0]
        if p.shape != (n,) or not torch.equal(p.sort().values, torch.arange(n)):
            raise ConfigError(f"permutation {i} is not a permutation of {n} units")


__all__ = ["Chain", "average", "chain_of", "interpolate", "learn_permutation_ste",
           "load_chain_", "loss_barrier", "permute_chain", "relu_chain_forward",
           "weight_matching"]
