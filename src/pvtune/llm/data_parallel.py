"""How the ranks of a data-parallel PV-Tuning run share a step: the gradient exchange and
where the discrete (V) step runs (``FinetuneConfig.vstep_placement``).

``replicated``
    One all-reduce averages the continuous gradients and the dense weight gradients; every
    rank steps every weight with the same deterministic group selection, so the codes agree
    without being sent. Every rank holds the V-step state (second moments, STE buffers) of
    every weight.
``owner``
    The weights are partitioned across the ranks by size (:func:`assign_layers`). The
    continuous gradients are all-reduced; the dense gradient of each weight is reduced to
    its owner only, the owner steps it (same seed as a single process would use) and sends
    the code bytes that changed (positions and values, or every byte when most changed).
    Each rank computes and stores the V step of its share alone, so the V-step time and
    state are divided by the process count, for one extra broadcast of codes per step.

Both give the single-process codes; the losses agree to float rounding.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from pvtune.distributed import DistributedContext, assign_layers, full_tensor
from pvtune.optim.pv import PVOptimizer, StepStats

PLACEMENTS = ("replicated", "owner")

# a changed byte travels as an int64 position and a uint8 value
_SPARSE_BYTES = 9


class StepExchange:
    """The collectives of one data-parallel PV step for ``layers`` (the decoder's
    compressed linears, by name) under ``placement``; single-process runs pass through.
    ``continuous_reduced``: FSDP has averaged the continuous gradients already."""

    def __init__(self, dist: DistributedContext, placement: str,
                 layers: dict[str, nn.Module], continuous_reduced: bool = False) -> None:
        self.dist, self.placement, self.layers = dist, placement, layers
        self.continuous_reduced = continuous_reduced  # by FSDP, during backward
        self.owner: dict[str, int] | None = None
        if placement == "owner" and dist.active:
            sizes = {n: layer.in_features * layer.out_features for n, layer in layers.items()}
            self.owner = assign_layers(sizes, dist.world_size)
        self.bytes_sent = 0  # code bytes this rank has broadcast as an owner

    def owned(self) -> set[str] | None:
        """The layers this rank steps (None: all of them)."""
        if self.owner is None:
            return None
        return {n for n, r in self.owner.items() if r == self.dist.rank}

    def reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Average the continuous gradients over the ranks, and the dense weight gradients
        on the ranks that step them (a missing gradient counts as zero, so every rank sends
        the same tensors)."""
        if not self.dist.active:
            return
        grads = []
        for p in [] if self.continuous_reduced else params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if self.owner is None:
            self.dist.average_(grads + self._dense_grads(self.layers))
            return
        self.dist.average_(grads)
        for rank in range(self.dist.world_size):
            self.dist.reduce_(self._dense_grads(self._layers_of(rank)), dst=rank)

    def step(self, opt: PVOptimizer, lr_scale: float) -> StepStats:
        """``opt.step`` on every rank; with owners, the changed codes then go from each owner
        to the others, and the statistics are summed over the ranks."""
        if self.owner is None:
            return opt.step(lr_scale=lr_scale)
        mine = self._layers_of(self.dist.rank)
        before = _code_bytes(mine)
        stats = opt.step(lr_scale=lr_scale)
        after = _code_bytes(mine)
        changed = (after != before).nonzero().squeeze(1)
        world = self.dist.world_size
        header = torch.zeros(world + 2, dtype=torch.int64, device=self.dist.device)
        header[self.dist.rank] = changed.numel()
        header[world], header[world + 1] = stats.groups_changed, stats.groups_total
        self.dist.sum_(header)
        for rank in range(world):
            count = int(header[rank])
            if count:
                self._share(rank, count, changed if rank == self.dist.rank else None, after)
        return replace(stats, groups_changed=int(header[world]),
                       groups_total=int(header[world + 1]))

    def v_state_tensors(self, opt: PVOptimizer) -> dict[str, Tensor] | None:
        """``opt.state_tensors()`` with every weight's V-step state, on rank 0 (None on the
        others): with owners, each rank's share is gathered (a collective: call on all)."""
        tensors = {k: full_tensor(v) for k, v in opt.state_tensors().items()}
        if self.owner is None:
            return tensors if self.dist.is_main else None
        own = {k: v for k, v in tensors.items() if k.startswith("pv.") and k != "pv.steps"}
        parts = self.dist.gather_objects(own, dst=0)
        if parts is None:
            return None
        for part in parts:
            tensors.update(part)
        return tensors

    def _layers_of(self, rank: int) -> dict[str, nn.Module]:
        return {n: layer for n, layer in self.layers.items() if self.owner[n] == rank}

    @staticmethod
    def _dense_grads(layers: dict[str, nn.Module]) -> list[Tensor]:
        return [layer.dense_weight.grad for layer in layers.values()
                if layer.dense_weight is not None and layer.dense_weight.grad is not None]

    def _share(self, owner: int, count: int, changed: Tensor | None, after: Tensor) -> None:
        """Send owner's changed code bytes to every rank and write them into the codes."""
        layers = self._layers_of(owner)
        sparse = count * _SPARSE_BYTES < _code_nbytes(layers)
        if owner == self.dist.rank:
            flat = after
        elif sparse:  # the receiver's own (unchanged) bytes, patched below
            flat = _code_bytes(layers)
        else:  # every byte arrives
            flat = torch.empty(_code_nbytes(layers), dtype=torch.uint8,
                               device=self.dist.device)
        if sparse:
            positions = changed if changed is not None else \
                torch.empty(count, dtype=torch.int64, device=flat.device)
            values = flat[positions] if changed is not None else \
                torch.empty(count, dtype=torch.uint8, device=flat.device)
            self.dist.broadcast_(positions, src=owner)
            self.dist.broadcast_(values, src=owner)
            sent = count * _SPARSE_BYTES
            if changed is None:
                flat[positions] = values
        else:
            self.dist.broadcast_(flat, src=owner)
            sent = flat.numel()
        if owner == self.dist.rank:
            self.bytes_sent += sent
        else:
            _write_code_bytes(layers, flat)


def _code_buffers(layers: dict[str, nn.Module]) -> list[Tensor]:
    return [getattr(layer.qweight, name) for layer in layers.values()
            for name in layer.qweight.code_buffers]


def _code_nbytes(layers: dict[str, nn.Module]) -> int:
    """How many bytes :func:`_code_bytes` of ``layers`` holds."""
    return sum(b.numel() * b.element_size() for b in _code_buffers(layers))


def _code_bytes(layers: dict[str, nn.Module]) -> Tensor:
    """Every code buffer of ``layers`` as one flat uint8 copy (the buffers' own bytes)."""
    buffers = _code_buffers(layers)
    if not buffers:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.cat([b.detach().reshape(-1).view(torch.uint8) for b in buffers])


def _write_code_bytes(layers: dict[str, nn.Module], flat: Tensor) -> None:
    """Inverse of :func:`_code_bytes`: copy the bytes back into the code buffers."""
    offset = 0
    with torch.no_grad():
        for buf in _code_buffers(layers):
            n = buf.numel() * buf.element_size()
            chunk = flat[offset:offset + n].clone().view(buf.dtype).reshape(buf.shape)
            buf.copy_(chunk)
            offset += n


__all__ = ["PLACEMENTS", "StepExchange"]
