"""Discrete (V) step strategies: how the codes of one compressed weight move each step.

Every strategy sees the weight's representation, the dense gradient ``g = dL/dW`` and a
per-weight state; it may keep a dense buffer ``y`` (straight-through variants). Buffers move
along Adam's direction with ``beta1 = 0`` (the published PV recipe's betas (0, 0.95)),
``d = g / (sqrt(v_hat) + eps * rms(sqrt(v_hat)))`` per entry. The buffer-free linearized V
steps move along ``d' = g / rms(g)`` with one running RMS per matrix, which keeps the
relative sizes of the gradient entries (per-entry normalisation would make every group look
alike).

Step sizes are relative: a weight moves by ``lr * d * u`` where ``u`` is its representation's
:meth:`~pvtune.reprs.base.QuantizedWeight.step_unit` (the grid step of its group, or its
row's scale). Both directions are scale-free and the units scale with the weights, so the
same ``lr`` takes the same code decisions on a model whose weights are 8x smaller.

* ``frozen``: codes never change (continuous-only fine-tuning).
* ``ste``: buffer ``y -= lr d u``; every group re-encoded to ``y`` every step.
* ``stochastic_rounding``: buffer ``y -= lr d u``; every group randomly rounded to a neighbour.
* ``linearized_v``: ``y = W - lr d' u``; every group projected (re-encoded).
* ``subspace_v``: ``y = W - lr d' u``; only the ``tau`` fraction of groups whose projection
  promises the largest decrease of the local quadratic model.
* ``subspace_v_ste``: buffer ``y -= lr d u``; only the ``tau`` fraction of groups whose
  re-encoding brings ``W`` closest to ``y``, among changes that lower the loss to first
  order (PV-Tuning with its authors' STE buffer).

Selection is a deterministic function of the scores, so data-parallel ranks that see the same
reduced gradients make identical discrete updates; the stochastic strategy draws from a
generator seeded per weight and step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from pvtune.registry import Registry
from pvtune.reprs.base import QuantizedWeight, check_range, times_unit


@dataclass(frozen=True)
class VStepConfig:
    """Settings of the discrete step.

    ``lr``: step size of the dense direction in units of each weight's step unit (None: the
    default for the strategy and representation, :func:`default_step_size`); ``beta2``,
    ``eps``: the buffer's second-moment average (``eps`` relative to its RMS); ``tau``:
    fraction of each matrix's groups re-encoded per step by the subspace strategies;
    ``trust_ratio``: if set,
    the largest code changes are rolled back until ``||dW|| <= trust_ratio * ||W||``;
    ``beam_size``: codebook search width; ``seed``: stochastic rounding.
    """

    strategy: str = "subspace_v_ste"
    lr: float | None = None
    beta2: float = 0.95
    eps: float = 1e-8
    tau: float = 0.01
    trust_ratio: float | None = None
    beam_size: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        STRATEGIES.get(self.strategy)  # KeyError lists the known strategies
        if self.lr is not None:
            check_range(self, "lr", self.lr, 0.0, None)
        check_range(self, "beta2", self.beta2, 0.0, 1.0)
        check_range(self, "tau", self.tau, 0.0, 1.0)
        check_range(self, "beam_size", self.beam_size, 1, 64)
        if self.trust_ratio is not None:
            check_range(self, "trust_ratio", self.trust_ratio, 0.0, None)


    @property
    def step_size(self) -> float:
        """``lr`` (resolve a None with :meth:`for_weight` first)."""
        if self.lr is None:
            raise ValueError("VStepConfig.lr is None: resolve it with for_weight(rep) first")
        return self.lr

    def for_weight(self, rep: QuantizedWeight) -> VStepConfig:
        """This config with ``lr`` resolved for ``rep``: an explicit ``lr`` wins, else the
        measured default (:func:`default_step_size`)."""
        if self.lr is not None:
            return self
        return dataclasses.replace(self, lr=default_step_size(self.strategy, rep))


# Default relative step sizes, per kind of step unit. They were measured on SmolLM2-135M at
# about 2 bits (20 steps of 2 x 256 tokens) as steps in weight units, then divided by the mean
# unit there: 0.302 for the 2-bit g64 grid step and 0.189 for AQLM's row scale (the rows' RMS).
# * ste, subspace_v_ste: 3e-3 on AQLM 2x8g8 (1e-2 hurt: 83.58 -> 223.1,
#   benchmarks/results/finetune_code_lr.md), and 0.01 of the grid step on the GGUF and
#   uniform grids: over 200 steps on Q2_0 the first default (0.033, from 1e-2 in weight units
#   over 20 steps) ended at 473.3 where 0.01 reached 90.86 (benchmarks/results/
#   finetune_sweep.md), and on the 70 MiB mixed file 0.033 rose after 30 steps where 0.01
#   kept improving to step 60 (benchmarks/results/frontier.md);
# * proximal_v: the STE step (it moves the same buffer);
# * stochastic_rounding: 1e-3 (3e-3 diverged: its noise grows with the buffer's distance
#   from the grid);
# * linearized_v, subspace_v: 3e-4 (one step lowered a held-out KL; 3x that raised it 3-10x).
DEFAULT_LR = {
    "grid": {"ste": 0.01, "subspace_v_ste": 0.01, "proximal_v": 0.01,
             "stochastic_rounding": 3.3e-3, "linearized_v": 1e-3, "subspace_v": 1e-3,
             "frozen": 0.0},
    "rms": {"ste": 0.016, "subspace_v_ste": 0.016, "stochastic_rounding": 5.3e-3,
            "linearized_v": 1.6e-3, "subspace_v": 1.6e-3, "frozen": 0.0},
}


def default_step_size(strategy: str, rep: QuantizedWeight) -> float:
    """Default relative step size of ``strategy`` on ``rep``: :data:`DEFAULT_LR` for the kind
    of its step unit (1e-2 for unregistered strategies)."""
    return DEFAULT_LR[rep.step_unit_kind].get(strategy, 1e-2)


class WeightState:
    """Per-weight state of the discrete step: second moment, optional buffer, step count."""

    def __init__(self, rep: QuantizedWeight, needs_buffer: bool) -> None:
        with torch.no_grad():
            w = rep().detach()
        self.sq_avg = torch.zeros_like(w)
        self.buffer = w.clone() if needs_buffer else None
        self.step = 0

    def tensors(self) -> dict[str, Tensor]:
        """Tensors to checkpoint (safetensors-ready)."""
        out = {"sq_avg": self.sq_avg, "step": torch.tensor(self.step)}
        if self.buffer is not None:
            out["buffer"] = self.buffer
        return out

    def load(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`tensors`."""
        self.sq_avg.copy_(tensors["sq_avg"])
        self.step = int(tensors["step"])
        if self.buffer is not None:
            self.buffer.copy_(tensors["buffer"])


def dense_direction(state: WeightState, grad: Tensor, config: VStepConfig) -> Tensor:
    """Adam direction with ``beta1 = 0``: ``g / (s + eps * rms(s))``, ``s = sqrt(v / (1 -
    beta2^t))``; the relative ``eps`` keeps it independent of the gradient's scale."""
    state.step += 1
    state.sq_avg.mul_(config.beta2).addcmul_(grad, grad, value=1 - config.beta2)
    bias = 1 - config.beta2 ** state.step
    denom = state.sq_avg.div(bias).sqrt_()  # in place: no temporaries
    # rms(s) = sqrt(mean(v) / bias): one pass over v, no squared copy of s
    floor = config.eps * math.sqrt(float(state.sq_avg.mean()) / bias)
    denom.add_(floor)
    if not floor >= 1e-30:  # all-zero gradients so far: keep the division finite
        denom.clamp_(min=1e-30)
    return torch.div(grad, denom, out=denom)


def matrix_direction(state: WeightState, grad: Tensor, config: VStepConfig) -> Tensor:
    """The gradient over the largest RMS this matrix's gradient has had so far.

    A plain gradient step ``W - grad / L`` with a step size fixed in units of that first
    (largest) gradient scale: the local model ``<g, dW> + L/2 ||dW||^2`` keeps a fixed
    curvature ``L = max_rms / lr``, so a small enough ``lr`` gives descent (a running
    average would shrink ``L`` as gradients shrink and lose that guarantee).
    """
    state.step += 1
    rms = grad.pow(2).mean().sqrt()
    state.sq_avg.copy_(torch.maximum(state.sq_avg, rms.expand_as(state.sq_avg)))
    return grad / state.sq_avg.reshape(-1)[0].clamp(min=1e-30)


def top_groups(score: Tensor, fraction: float) -> Tensor:
    """Bool mask of the ``ceil(fraction * n)`` groups with the largest positive score."""
    flat = score.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[top_indices(flat, math.ceil(fraction * flat.numel()))] = True
    return mask.view_as(score)


_PREFILTER_MIN = 1 << 16  # below this many scores a plain top-k is as fast


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices (ascending) of the ``k`` largest positive entries of the 1-D ``scores``, or of
    all positive entries when fewer; among equal scores the lower index wins.

    A deterministic function of the scores on any device, so ranks that see the same
    gradients agree. On large inputs a threshold from a strided sample first discards most
    entries (a full top-k of a few percent of a million scores is slow on CPUs); the result
    is exact: when at least ``k`` scores exceed the threshold, the ``k`` largest are all
    among them.
    """
    n, pool = scores.numel(), None
    if k > 0 and n >= _PREFILTER_MIN and 8 * k <= n:
        sample = scores[:: n // 8192]
        # about the 2k-th largest of the sample's share: k of n usually lie above it
        rank = max(1, sample.numel() - math.ceil(2 * k * sample.numel() / n))
        threshold = torch.kthvalue(sample, rank).values
        if threshold >= 0:  # then the pool holds positive entries only
            above = (scores > threshold).nonzero().squeeze(1)
            if above.numel() >= k:
                pool = above
    if pool is None:
        pool = (scores > 0).nonzero().squeeze(1)
        k = min(k, pool.numel())
        if k <= 0:
            return torch.zeros(0, dtype=torch.long, device=scores.device)
    values = scores[pool]
    kth = torch.kthvalue(values, values.numel() - k + 1).values  # the k-th largest
    # everything above the k-th value, then the lowest-index ties to fill k; pool ascends
    keep = values > kth
    tied = (values == kth).nonzero().squeeze(1)
    keep[tied[: k - int(torch.count_nonzero(keep))]] = True
    return pool[keep]


def group_sq_norm(rep: QuantizedWeight, x: Tensor) -> Tensor:
    """Squared norm of ``x`` (weight-shaped) per encode group of ``rep``."""
    sq = x.pow(2)
    if rep.code_group_size == 1:  # groups of one weight: no sum to take
        return sq.reshape(rep.groups_shape)
    return sq.reshape(*rep.groups_shape, rep.code_group_size).sum(-1)


def apply_trust_ratio(rep: QuantizedWeight, w_old: Tensor, codes_old: dict[str, Tensor],
                      trust_ratio: float) -> None:
    """Roll back the largest group changes until ``||W_new - W_old|| <= trust * ||W_old||``
    (the smallest changes are kept first, so the step stays proximal)."""
    with torch.no_grad():
        change = group_sq_norm(rep, rep() - w_old).reshape(-1)
        budget = (trust_ratio * float(w_old.norm())) ** 2
        if float(change.sum()) <= budget:
            return
        order = torch.argsort(change, stable=True)
        keep_sorted = torch.cumsum(change[order], 0) <= budget
        keep = torch.zeros_like(change, dtype=torch.bool)
        keep[order[keep_sorted]] = True
        rep.restore_codes(codes_old, keep=keep.view(rep.groups_shape))


class Strategy(Protocol):
    """A discrete step: updates ``rep``'s codes in place from the dense gradient; a strategy
    registered with ``counts_changes`` returns how many groups' codes it changed."""

    needs_buffer: bool
    moves_codes: bool
    counts_changes: bool

    def __call__(self, rep: QuantizedWeight, grad: Tensor, state: WeightState,
                 config: VStepConfig, generator: torch.Generator) -> int | None: ...


STRATEGIES: Registry[str, Strategy] = Registry("discrete step strategy")


def register_strategy(name: str, needs_buffer: bool, moves_codes: bool = True,
                      counts_changes: bool = False):
    """Decorator registering a strategy function under ``name``: ``needs_buffer`` gives it
    a dense buffer in its state; ``moves_codes=False`` says it never changes codes (so no
    dense gradient is captured for it); ``counts_changes=True`` says it returns the number
    of groups whose codes it changed (the optimizer then need not compare every code)."""

    def wrap(fn):
        fn.needs_buffer = needs_buffer
        fn.moves_codes = moves_codes
        fn.counts_changes = counts_changes
        return STRATEGIES.register(name, fn)

    return wrap


@register_strategy("frozen", needs_buffer=False, moves_codes=False)
def frozen(rep, grad, state, config, generator) -> None:
    """Codes never change."""


@register_strategy("ste", needs_buffer=True)
def straight_through(rep, grad, state, config, generator) -> None:
    """Dense buffer updated with the dense gradient; every group re-encoded every step."""
    move_buffer(rep, state, grad, config)
    rep.encode(state.buffer, None, beam_size=config.beam_size)


@register_strategy("stochastic_rounding", needs_buffer=True)
def stochastic_rounding(rep, grad, state, config, generator) -> None:
    """Dense buffer step, then unbiased random rounding of every group to a neighbour."""
    move_buffer(rep, state, grad, config)
    rep.stochastic_encode(state.buffer, generator=generator, beam_size=config.beam_size)


@register_strategy("linearized_v", needs_buffer=False)
def linearized_v(rep, grad, state, config, generator) -> None:
    """Project ``W - lr d`` onto the representable set, all groups (naive linearized V)."""
    with torch.no_grad():
        step = times_unit(matrix_direction(state, grad, config), rep.step_unit())
        y = rep() - config.step_size * step
    rep.encode(y, None, beam_size=config.beam_size)


PRESELECT = 4  # subspace strategies search codes for PRESELECT * tau of the groups, keep tau


@register_strategy("subspace_v", needs_buffer=False, counts_changes=True)
def subspace_v(rep, grad, state, config, generator) -> int:
    """Linearized V restricted to the ``tau`` fraction of groups whose projected update
    promises the largest decrease of the local model ``<g, dW> + ||dW||^2 / (2 lr_eff)``
    (groups whose projection would not lower it keep their codes).

    Candidates are the ``PRESELECT * tau`` groups with the largest gradient norm; their codes
    are projected, then only the best ``tau`` fraction keeps its new codes.
    """
    matrix_direction(state, grad, config)  # updates the running max RMS of the gradient
    with torch.no_grad():
        w = rep()
        # a gradient step with per-entry step size eta = lr * unit / max-rms(grad)
        inv_rms = 1.0 / float(state.sq_avg.reshape(-1)[0].clamp(min=1e-30))
        eta = times_unit(torch.full_like(grad, config.step_size * inv_rms), rep.step_unit())
        step = eta * grad
        candidates = top_indices(group_sq_norm(rep, step).reshape(-1),
                                 math.ceil(PRESELECT * config.tau * group_count(rep)))
        if candidates.numel() == 0:
            return 0
        old = rep.snapshot_groups(candidates)
        w_old = in_groups(rep, w, candidates)
        rep.encode_groups(candidates, w_old - in_groups(rep, step, candidates),
                          beam_size=config.beam_size)
        delta = rep.decode_groups(candidates) - w_old
        # decrease of the local model <g, dW> + sum dW^2 / (2 eta), per candidate group
        gain = -(in_groups(rep, grad, candidates) * delta).sum(-1) \
            - (delta.pow(2) / (2 * in_groups(rep, eta, candidates).clamp(min=1e-30))).sum(-1)
        return keep_among(rep, old, candidates, gain, config.tau)


@register_strategy("subspace_v_ste", needs_buffer=True, counts_changes=True)
def subspace_v_ste(rep, grad, state, config, generator) -> int:
    """Dense buffer (STE) with re-encoding limited to the ``tau`` fraction of groups whose
    new codes bring the decoded weight closest to the buffer.

    Candidates are at most ``PRESELECT * tau`` of the groups: those where the buffer lies
    far enough from the decoded weight for its codes to change at all (the representation's
    :meth:`~pvtune.reprs.base.QuantizedWeight.change_threshold`; every group where it knows
    none), the ones where the buffer and the decoded weight differ most relative to the row's
    mean square weight if there are more. Their codes are re-encoded to the buffer. A new
    code is kept only where the current gradient agrees with the change
    (``<g, W_new - W> < 0``), and of those only the ``tau`` fraction with the largest
    decrease of ``||y - W||^2`` (a wide gap alone often sits inside one code's cell, where
    re-encoding changes nothing).
    """
    move_buffer(rep, state, grad, config)
    with torch.no_grad():
        w = rep()
        budget = math.ceil(PRESELECT * config.tau * group_count(rep))
        candidates = _movable_groups(rep, state.buffer, w)
        if candidates is None or candidates.numel() > budget:
            # the buffer moves by about lr per entry whatever the row's magnitude, while code
            # cells scale with it: rank by the gap relative to the row's mean square
            row_rms = torch.linalg.vector_norm(w, dim=-1, keepdim=True) / math.sqrt(w.shape[-1])
            relative = (state.buffer - w).div_(row_rms.clamp_(min=1e-15))
            score = group_sq_norm(rep, relative).reshape(-1)
            del relative
            if candidates is None:
                candidates = top_indices(score, budget)
            else:
                candidates = candidates[top_indices(score[candidates], budget)]
        if candidates.numel() == 0:
            return 0
        old = rep.snapshot_groups(candidates)
        w_old = in_groups(rep, w, candidates)
        y = in_groups(rep, state.buffer, candidates)
        rep.encode_groups(candidates, y, beam_size=config.beam_size)
        w_new = rep.decode_groups(candidates)
        decrease = (y - w_old).pow(2).sum(-1) - (y - w_new).pow(2).sum(-1)
        # first-order change of the loss: changes the current gradient disagrees with stay out
        descent = (in_groups(rep, grad, candidates) * (w_new - w_old)).sum(-1) < 0
        return keep_among(rep, old, candidates, torch.where(descent, decrease,
                                                            torch.zeros_like(decrease)),
                          config.tau)


def _movable_groups(rep: QuantizedWeight, buffer: Tensor, w: Tensor) -> Tensor | None:
    """Flat indices (ascending) of the groups where ``buffer`` lies at least ``rep``'s
    change threshold from ``w`` in some entry; None when ``rep`` knows no threshold."""
    limit = rep.change_threshold()
    if limit is None:
        return None
    gap = torch.sub(buffer, w).abs_()
    far = torch.ge(gap.view(gap.shape[0], limit.shape[1], -1), limit.unsqueeze(-1))
    del gap
    far = far.view(-1, rep.code_group_size)
    if rep.code_group_size > 1:
        far = far.any(-1)
    return far.reshape(-1).nonzero().squeeze(1)


def move_buffer(rep: QuantizedWeight, state: WeightState, grad: Tensor,
                config: VStepConfig) -> None:
    """``y -= lr * d * unit``: the buffer's Adam step in units of ``rep``'s step unit."""
    d = dense_direction(state, grad, config)
    unit = rep.step_unit()
    k = unit.shape[1]  # one fused pass: y += (-lr) * d * unit, the unit broadcast per group
    state.buffer.view(d.shape[0], k, -1).addcmul_(d.view(d.shape[0], k, -1),
                                                  unit.unsqueeze(-1), value=-config.step_size)


def group_count(rep: QuantizedWeight) -> int:
    """Number of encode groups of ``rep``."""
    return rep.groups_shape[0] * rep.groups_shape[1]


def in_groups(rep: QuantizedWeight, x: Tensor, index: Tensor) -> Tensor:
    """Entries of the weight-shaped ``x`` in the groups at flat ``index``, ``[n, size]``."""
    return x.reshape(-1, rep.code_group_size).index_select(0, index)


def keep_among(rep: QuantizedWeight, old: dict[str, Tensor], candidates: Tensor,
               score: Tensor, fraction: float) -> int:
    """Keep the new codes of the ``ceil(fraction * groups)`` candidates with the largest
    positive ``score``; every other candidate gets back its ``old`` codes (the
    :meth:`~pvtune.reprs.base.QuantizedWeight.snapshot_groups` of ``candidates``). Returns
    the number of groups whose codes changed."""
    revert = torch.ones(candidates.numel(), dtype=torch.bool, device=candidates.device)
    revert[top_indices(score, math.ceil(fraction * group_count(rep)))] = False
    rep.restore_groups(candidates[revert], {k: v[revert] for k, v in old.items()})
    kept = ~revert
    if not bool(kept.any()):
        return 0
    after = rep.snapshot_groups(candidates[kept])
    changed = torch.zeros(int(kept.sum()), dtype=torch.bool, device=candidates.device)
    for name, before in old.items():
        changed |= (after[name] != before[kept]).reshape(changed.shape[0], -1).any(-1)
    return int(changed.sum())
