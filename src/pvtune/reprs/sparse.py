"""N:M structured sparsity: which ``n`` of every ``m`` weights are kept is the discrete part,
the kept values are continuous."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.packing import BitCodec, IntCodec
from pvtune.reprs.base import (
    QuantizedWeight,
    ReprConfig,
    ceil_log2,
    check_group_divides,
    check_int,
    check_range,
    register_representation,
    round_to_fp16,
)

MAX_PATTERNS = 1 << 16  # a block's pattern index fits 16 bits


@dataclass(frozen=True)
class NMSparseConfig(ReprConfig):
    """Keep ``n`` of every ``m`` consecutive input weights (2:4 by default).

    Stored per block: the ``n`` kept values (fp16, in position order) and the index of the
    block's pattern among the ``C(m, n)`` sets of kept positions. Bits/param =
    ``(n * 16 + ceil(log2 C(m, n))) / m``, e.g. 8.75 for 2:4.
    """

    n: int = 2
    m: int = 4

    def __post_init__(self) -> None:
        check_int(self, "m", self.m)
        check_int(self, "n", self.n)
        check_range(self, "m", self.m, 2, None)
        check_range(self, "n", self.n, 1, self.m - 1)
        if math.comb(self.m, self.n) > MAX_PATTERNS:
            raise ConfigError(
                f"NMSparseConfig: {self.n}:{self.m} has {math.comb(self.m, self.n)} patterns per "
                f"block, more than {MAX_PATTERNS}; use a smaller m (at most 16 always works)"
            )

    @property
    def num_patterns(self) -> int:
        """``C(m, n)``: the sets of kept positions a block can have."""
        return math.comb(self.m, self.n)

    def check_shape(self, out_features: int, in_features: int) -> None:
        check_group_divides(self, "m", self.m, in_features)


@register_representation("nm_sparse")
class NMSparseWeight(QuantizedWeight):
    """``W[o, m*j + p_k] = values[o, j, k]`` where ``p_0 < ... < p_{n-1}`` are the positions of
    pattern ``pattern[o, j]``; every other weight of the block is zero.

    ``pattern [out, in/m]`` (integer codes), ``values [out, in/m, n]`` (parameter). With the
    values fixed, :meth:`encode` picks for each block the pattern whose positions, filled with
    the block's values in order, are closest to the target.
    """

    config_cls = NMSparseConfig

    def __init__(self, out_features: int, in_features: int, config: NMSparseConfig) -> None:
        super().__init__(out_features, in_features, config)
        blocks = in_features // config.m
        self.bits = ceil_log2(config.num_patterns)
        dtype = torch.uint8 if self.bits <= 8 else torch.int32
        self.register_buffer("pattern", torch.zeros(out_features, blocks, dtype=dtype))
        self.values = nn.Parameter(torch.zeros(out_features, blocks, config.n))
        table = torch.tensor(list(itertools.combinations(range(config.m), config.n)))
        self.register_buffer("_positions", table, persistent=False)  # [C, n], ascending

    @property
    def code_group_size(self) -> int:
        return self.config.m

    def pattern_index(self, positions: Tensor) -> Tensor:
        """Index into the pattern table of ascending ``positions [..., n]``."""
        key = (1 << positions).sum(-1)  # each position set as a bit mask
        table_keys = (1 << self._positions).sum(-1)
        lookup = torch.full((1 << self.config.m,), -1, dtype=torch.long, device=key.device)
        lookup[table_keys] = torch.arange(len(table_keys), device=key.device)
        return lookup[key]

    def init_from_dense(self, weight: Tensor) -> None:
        """Keep the ``n`` largest magnitudes of each block at their values (rounded to fp16)."""
        blocks = weight.reshape(self.out_features, -1, self.config.m)
        keep = blocks.abs().topk(self.config.n, dim=-1).indices.sort(-1).values
        with torch.no_grad():
            self.values.copy_(round_to_fp16(blocks.gather(-1, keep)))
            self.pattern.copy_(self.pattern_index(keep).to(self.pattern.dtype))

    def _scatter(self, pattern: Tensor, values: Tensor) -> Tensor:
        positions = self._positions[pattern.long()]  # [..., n]
        dense = torch.zeros(*values.shape[:-1], self.config.m, dtype=values.dtype,
                            device=values.device)
        return dense.scatter(-1, positions, values)

    def forward(self) -> Tensor:
        return self._scatter(self.pattern, self.values).reshape(self.out_features,
                                                                self.in_features)

    def decode_groups(self, index: Tensor) -> Tensor:
        with torch.no_grad():
            return self._scatter(self.pattern.view(-1)[index],
                                 self.values.detach().view(-1, self.config.n)[index])

    def _pattern_costs(self, target: Tensor, values: Tensor) -> Tensor:
        """``||block(p) - t||^2 - ||t||^2`` for every block and pattern ``p``: ``[G, C]``."""
        t = target.unsqueeze(1)  # [G, 1, m]
        per_slot = (values.unsqueeze(-1) - t).pow(2) - t.pow(2)  # [G, n, m]: value k at pos j
        cost = torch.zeros(target.shape[0], self._positions.shape[0], device=target.device)
        for k in range(self.config.n):
            cost += per_slot[:, k, :][:, self._positions[:, k]]
        return cost

    def encode(
        self, target: Tensor, groups: Tensor | None = None, beam_size: int | None = None
    ) -> None:
        """Best pattern per block with the values fixed (exhaustive over the ``C(m, n)``
        patterns); a block keeps its pattern unless another is strictly closer."""
        target, groups = self._check_inputs(target, groups, beam_size)
        m, n = self.config.m, self.config.n
        with torch.no_grad():
            flat_pattern = self.pattern.view(-1)
            blocks = target.reshape(-1, m)
            values = self.values.detach().reshape(-1, n)
            index = None if groups is None else groups.reshape(-1).nonzero().squeeze(1)
            if index is not None:
                blocks, values = blocks[index], values[index]
            old = flat_pattern.long() if index is None else flat_pattern[index].long()
            step = max(1, (1 << 20) // (n * m + self._positions.shape[0]))
            best = torch.empty_like(old)
            for s in range(0, blocks.shape[0], step):
                cost = self._pattern_costs(blocks[s:s + step], values[s:s + step])
                new = cost.argmin(-1)
                keep_old = cost.gather(1, old[s:s + step, None]).squeeze(1) <= \
                    cost.gather(1, new[:, None]).squeeze(1)
                best[s:s + step] = torch.where(keep_old, old[s:s + step], new)
            if index is None:
                flat_pattern.copy_(best.to(flat_pattern.dtype))
            else:
                flat_pattern[index] = best.to(flat_pattern.dtype)

    def step_unit(self) -> Tensor:
        """The RMS of each row's kept values."""
        with torch.no_grad():
            return self.values.pow(2).mean((1, 2)).sqrt().view(-1, 1)

    def bits_per_param(self) -> float:
        c = self.config
        return (c.n * 16 + self.bits) / c.m

    def integer_codecs(self) -> dict[str, IntCodec]:
        return {"pattern": BitCodec(self.bits)}

    @property
    def code_buffers(self) -> tuple[str, ...]:
        return ("pattern",)
