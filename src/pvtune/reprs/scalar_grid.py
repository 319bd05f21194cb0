"""The shared machinery of scalar grids: integer codes ``[out, in]`` on a grid whose
parameters are one set per group of ``group`` consecutive input weights (a uniform grid's
scale and zero-point, a GGUF block's ``d`` and ``m``).

A subclass says how a value maps to its nearest code and to its fractional code position
under one group's parameters; nearest and unbiased random rounding, of every group or of
some, follow from that here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pvtune.reprs.base import QuantizedWeight, uniform_noise


class ScalarGridWeight(QuantizedWeight):
    """Base of scalar-grid representations (uint8 ``codes`` ``[out, in]``, ``group``)."""

    codes: Tensor
    group: int

    # -- what a subclass defines ----------------------------------------------------------
    def grid_params(self, dtype: torch.dtype) -> tuple[Tensor, ...]:
        """The grid's parameters per group, each ``[out, in / group]``, without gradient."""
        raise NotImplementedError

    @property
    def max_code(self) -> int:
        """The largest code."""
        raise NotImplementedError

    def nearest_codes(self, x: Tensor, *params: Tensor) -> Tensor:
        """The nearest code of each value of ``x`` under ``params`` (broadcast to ``x``)."""
        raise NotImplementedError

    def code_position(self, x: Tensor, *params: Tensor) -> Tensor:
        """Where each value of ``x`` falls between codes (code ``k`` at ``k``)."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------
    def change_threshold(self) -> Tensor:
        """Just under half the grid step: the levels are :meth:`step_unit` apart, so a target
        nearer its weight's level than half of that keeps the weight's code."""
        return self.step_unit() * (0.5 * (1 - 1e-3))

    def grouped(self, w: Tensor) -> Tensor:
        """``w`` (``[out, in]``) as ``[out, in / group, group]``."""
        return w.reshape(self.out_features, -1, self.group)

    def group_index(self, index: Tensor) -> Tensor:
        """The flat index of the group (of its grid parameters) of each flat weight index."""
        return (index // self.in_features) * (self.in_features // self.group) \
            + (index % self.in_features) // self.group

    def encode(
        self, target: Tensor, groups: Tensor | None = None, beam_size: int | None = None
    ) -> None:
        target, groups = self._check_inputs(target, groups, beam_size)
        with torch.no_grad():
            params = self.grid_params(target.dtype)
            if groups is None:
                q = self.nearest_codes(self.grouped(target), *(p.unsqueeze(-1) for p in params))
                self.codes.copy_(q.reshape(self.codes.shape).to(torch.uint8))
            else:  # only the selected weights: no full-size work
                sel = groups.reshape(-1).nonzero().squeeze(1)
                self._encode_at(sel, target.reshape(-1)[sel], params)

    def encode_groups(self, index: Tensor, values: Tensor,
                      beam_size: int | None = None) -> None:
        """Nearest codes of ``values`` at the weights of flat ``index`` (each weight its own
        encode group), read and written in place: no full-size work."""
        values = self._check_group_values(index, values)
        with torch.no_grad():
            self._encode_at(index, values.reshape(-1), self.grid_params(values.dtype))

    def _encode_at(self, index: Tensor, values: Tensor, params: tuple[Tensor, ...]) -> None:
        """Nearest codes of the flat weights at ``index`` to ``values``, under ``params``."""
        at = self.group_index(index)
        q = self.nearest_codes(values, *(p.reshape(-1).index_select(0, at) for p in params))
        self.codes.view(-1)[index] = q.to(torch.uint8)

    def stochastic_encode(
        self, target: Tensor, generator: torch.Generator | None = None,
        groups: Tensor | None = None, beam_size: int | None = None,
    ) -> None:
        """Unbiased random rounding of ``target`` to one of its two neighbouring codes."""
        target, groups = self._check_inputs(target, groups, beam_size)
        with torch.no_grad():
            params = self.grid_params(target.dtype)
            x = self.code_position(self.grouped(target), *(p.unsqueeze(-1) for p in params))
            q = torch.clamp(torch.floor(x + uniform_noise(x, generator)), 0, self.max_code)
            q = q.reshape(self.codes.shape).to(torch.uint8)
            self.codes.copy_(q if groups is None else torch.where(groups, q, self.codes))
