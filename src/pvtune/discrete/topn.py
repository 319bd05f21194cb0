"""Learned top-n token selection under a budget (QTSplus-style).

A :class:`TopNSelector` scores tokens against a query (scaled dot product), predicts a keep
ratio ``rho`` in ``[rho_min, rho_max]`` from statistics of those scores and keeps
``n = ceil(rho * M)`` of the ``M`` tokens:

* in training, the mask is the hard top-n in the forward pass and, in the backward pass, the
  gradient of a soft gate ``sigmoid((s - theta) / tau)`` whose threshold ``theta`` makes the
  gates sum to ``rho * M`` (found by bisection, then one differentiable Newton step), so both
  the scores and ``rho`` learn;
* at inference, the hard top-n, gathered in the tokens' original order (:func:`gather_kept`).

:func:`budget_loss` pushes ``rho`` down; the task loss pushes it up where tokens matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.estimators import hard_forward


@dataclass(frozen=True)
class TopNConfig:
    """A selector over tokens of width ``dim`` for queries of width ``query_dim``.

    ``score_dim``: width of the query/key projections; ``rho_min``/``rho_max``: range of the
    keep ratio; ``tau``: temperature of the soft gate; ``bisection_steps``: iterations of the
    threshold search."""

    dim: int
    query_dim: int
    score_dim: int = 32
    rho_min: float = 0.02
    rho_max: float = 1.0
    tau: float = 0.25
    bisection_steps: int = 30

    def __post_init__(self) -> None:
        if min(self.dim, self.query_dim, self.score_dim) < 1:
            raise ConfigError("dim, query_dim and score_dim must be >= 1")
        if not 0.0 < self.rho_min <= self.rho_max <= 1.0:
            raise ConfigError(f"need 0 < rho_min <= rho_max <= 1, got {self.rho_min}, "
                              f"{self.rho_max}")
        if self.tau <= 0:
            raise ConfigError(f"tau must be > 0, got {self.tau}")
        if self.bisection_steps < 1:
            raise ConfigError(f"bisection_steps must be >= 1, got {self.bisection_steps}")


@dataclass
class Selection:
    """A selector's result for a batch of ``B`` sequences of ``M`` tokens.

    ``mask`` ``[B, M]``: 1 for kept tokens (a straight-through gate in training);
    ``scores`` ``[B, M]``; ``keep_ratio`` ``[B]`` (``rho``); ``counts`` ``[B]`` (``n``)."""

    mask: Tensor
    scores: Tensor
    keep_ratio: Tensor
    counts: Tensor


def hard_topn_mask(scores: Tensor, counts: Tensor) -> Tensor:
    """``[B, M]`` 0/1 mask of the ``counts[b]`` highest scores of each row (ties: lower
    index first)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(
        scores.shape[-1], device=scores.device).expand_as(order))
    return (ranks < counts.unsqueeze(-1)).to(scores.dtype)


def soft_threshold_gate(scores: Tensor, target: Tensor, tau: float, steps: int = 30) -> Tensor:
    """Gates ``sigmoid((s - theta) / tau)`` with ``theta`` per row such that each row's gates
    sum to ``target`` (``[B]``, in ``(0, M)``): bisection (no gradient), then one Newton step
    that carries the gradient to ``scores`` and ``target``."""
    m = scores.shape[-1]
    target = target.clamp(1e-3, m - 1e-3)
    with torch.no_grad():
        s = scores.detach()
        lo = s.min(-1).values - 20 * tau
        hi = s.max(-1).values + 20 * tau
        t = target.detach()
        for _ in range(steps):
            mid = (lo + hi) / 2
            total = torch.sigmoid((s - mid.unsqueeze(-1)) / tau).sum(-1)
            too_many = total > t
            lo = torch.where(too_many, mid, lo)
            hi = torch.where(too_many, hi, mid)
        theta0 = (lo + hi) / 2
    g = torch.sigmoid((scores - theta0.unsqueeze(-1)) / tau)
    slope = (g * (1 - g)).sum(-1).clamp_min(1e-6)
    theta = theta0 + (g.sum(-1) - target) * tau / slope
    return torch.sigmoid((scores - theta.unsqueeze(-1)) / tau)


class TopNSelector(nn.Module):
    """Scores tokens against a query, predicts a keep ratio and keeps the top ``n`` (see the
    module doc)."""

    STATS = 5

    def __init__(self, config: TopNConfig) -> None:
        super().__init__()
        self.config = config
        self.query = nn.Linear(config.query_dim, config.score_dim)
        self.key = nn.Linear(config.dim, config.score_dim)
        self.ratio = nn.Sequential(nn.Linear(self.STATS + config.query_dim, 32), nn.GELU(),
                                   nn.Linear(32, 1))

    def score(self, tokens: Tensor, query: Tensor) -> Tensor:
        """Relevance ``[B, M]``: scaled dot product of projected query and tokens."""
        self._check(tokens, query)
        q = self.query(query).unsqueeze(1)
        k = self.key(tokens)
        return (q * k).sum(-1) / math.sqrt(self.config.score_dim)

    def keep_ratio(self, scores: Tensor, query: Tensor) -> Tensor:
        """``rho`` ``[B]`` in ``[rho_min, rho_max]`` from score statistics and the query."""
        cfg = self.config
        stats = torch.stack([torch.sigmoid(scores).mean(-1), scores.mean(-1),
                             scores.std(-1, unbiased=False), scores.max(-1).values,
                             scores.min(-1).values], dim=-1)
        raw = self.ratio(torch.cat([stats, query], dim=-1)).squeeze(-1)
        return cfg.rho_min + (cfg.rho_max - cfg.rho_min) * torch.sigmoid(raw)

    def forward(self, tokens: Tensor, query: Tensor) -> Selection:
        """Select from ``tokens`` ``[B, M, dim]`` for ``query`` ``[B, query_dim]``."""
        scores = self.score(tokens, query)
        rho = self.keep_ratio(scores, query)
        m = tokens.shape[1]
        counts = torch.ceil(rho.detach() * m - 1e-6).clamp(1, m).long()
        hard = hard_topn_mask(scores.detach(), counts)
        if not self.training:
            return Selection(hard, scores, rho, counts)
        soft = soft_threshold_gate(scores, rho * m, self.config.tau, self.config.bisection_steps)
        return Selection(hard_forward(hard, soft), scores, rho, counts)

    def _check(self, tokens: Tensor, query: Tensor) -> None:
        cfg = self.config
        if tokens.dim() != 3 or tokens.shape[-1] != cfg.dim:
            raise ConfigError(f"tokens must be [batch, tokens, {cfg.dim}], got "
                              f"{list(tokens.shape)}")
        if query.shape != (tokens.shape[0], cfg.query_dim):
            raise ConfigError(f"query must be [batch, {cfg.query_dim}], got {list(query.shape)}")


def gather_kept(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """The kept tokens of each row in their original order, padded to the largest count:
    ``(kept [B, n_max, dim], valid [B, n_max] bool)``."""
    keep = mask.detach() > 0.5
    counts = keep.sum(-1)
    n_max = int(counts.max()) if counts.numel() else 0
    # kept positions first (in order), then the rest: a stable sort on "not kept"
    order = (~keep).to(torch.int8).argsort(dim=-1, stable=True)[:, :n_max]
    kept = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    valid = torch.arange(n_max, device=tokens.device).unsqueeze(0) < counts.unsqueeze(-1)
    return kept * valid.unsqueeze(-1), valid


def budget_loss(keep_ratio: Tensor) -> Tensor:
    """The budget penalty: the mean keep ratio (add it with a weight to the task loss)."""
    return keep_ratio.mean()


__all__ = ["Selection", "TopNConfig", "TopNSelector", "budget_loss", "gather_kept",
           "hard_topn_mask", "soft_threshold_gate"]
