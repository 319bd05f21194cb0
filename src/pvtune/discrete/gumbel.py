"""Gumbel-softmax straight-through as a layer with an annealed temperature (Jang et al. 2017;
the estimator STGFlow's classifier guidance relies on).

The estimator itself is :func:`pvtune.estimators.gumbel_softmax_st`: a hard one-hot sample
forward, the gradient of ``softmax((logits + G) / tau)`` backward.

Example::

    sampler = GumbelSoftmaxST(TemperatureSchedule(start=1.0, end=0.1, steps=100))
    onehot = sampler(logits)
    sampler.step()                  # anneal tau
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.estimators import gumbel_softmax_st, sample_gumbel


@dataclass(frozen=True)
class TemperatureSchedule:
    """``tau`` from ``start`` to ``end`` over ``steps`` steps, ``exponential`` (geometric) or
    ``linear``; it stays at ``end`` afterwards."""

    start: float = 1.0
    end: float = 1.0
    steps: int = 1
    kind: str = "exponential"

    def __post_init__(self) -> None:
        if self.start <= 0 or self.end <= 0:
            raise ConfigError(f"temperatures must be > 0, got {self.start} -> {self.end}")
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.kind not in ("exponential", "linear"):
            raise ConfigError(f"kind must be exponential or linear, got {self.kind!r}")

    def __call__(self, step: int) -> float:
        """The temperature at ``step`` (0-based)."""
        t = min(max(step, 0), self.steps) / self.steps
        if self.kind == "linear":
            return self.start + (self.end - self.start) * t
        return math.exp(math.log(self.start) + (math.log(self.end) - math.log(self.start)) * t)


class GumbelSoftmaxST(nn.Module):
    """Categorical samples over the last axis of ``logits`` at the schedule's temperature:
    straight-through one-hots (``hard=True``) or relaxed samples ``softmax((logits + G) /
    tau)`` (``hard=False``). Call :meth:`step` once per training (or guidance) step. In eval
    mode it returns the noiseless argmax one-hot unless ``sample_in_eval``."""

    def __init__(self, schedule: TemperatureSchedule | None = None, *, hard: bool = True,
                 sample_in_eval: bool = False) -> None:
        super().__init__()
        self.schedule = schedule or TemperatureSchedule()
        self.hard = hard
        self.sample_in_eval = sample_in_eval
        self.steps_taken = 0

    @property
    def tau(self) -> float:
        """The current temperature."""
        return self.schedule(self.steps_taken)

    def step(self) -> None:
        """Advance the temperature schedule by one step."""
        self.steps_taken += 1

    def forward(self, logits: Tensor, generator: torch.Generator | None = None,
                noise: Tensor | None = None) -> Tensor:
        """One sample per row of ``logits``; ``noise`` fixes the Gumbel noise."""
        if noise is not None:
            if noise.shape != logits.shape:
                raise ConfigError(f"noise has shape {list(noise.shape)}, logits "
                                  f"{list(logits.shape)}")
        elif not self.training and not self.sample_in_eval:
            noise = torch.zeros_like(logits)
        else:
            noise = sample_gumbel(logits.shape, generator=generator, dtype=logits.dtype,
                                  device=logits.device)
        if self.hard:
            return gumbel_softmax_st(logits, self.tau, gumbel=noise)
        return torch.softmax((logits + noise) / self.tau, dim=-1)


__all__ = ["GumbelSoftmaxST", "TemperatureSchedule"]
