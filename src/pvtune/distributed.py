"""Data parallelism on PyTorch's own engine (``torch.distributed``, started by ``torchrun``).

Each process reads its rank and the world size from the environment ``torchrun`` sets, joins
the process group (``gloo`` on CPU, ``nccl`` on CUDA) and takes a contiguous shard of every
global micro-batch. After the backward passes of a step, one all-reduce averages the
gradients of the continuous parameters *and* the dense weight gradients the discrete (V) step
reads, so every rank takes the identical P and V steps from identical gradients and the
models stay equal without broadcasting codes. (DDP would reduce only ``nn.Parameter``
gradients, and during every backward; the dense gradients need the same reduction, once per
step, so one flat all-reduce does both.)

Example::

    ctx = DistributedContext.from_environment()   # rank 0 of 1 outside torchrun
    index = ctx.shard(global_index)                # this rank's sequences
    ...backward...
    ctx.average_([p.grad for p in params])
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from pvtune.errors import ConfigError, PvtuneError


class DistributedError(PvtuneError, RuntimeError):
    """A process of a distributed run failed or could not join (the message names the rank)."""


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a data-parallel run: ``rank`` of ``world_size``, with the
    model's tensors on ``device`` (``cpu``, or ``cuda:N`` for NCCL)."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} of world size {self.world_size} is impossible")

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that logs, shows progress and writes files)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1

    @classmethod
    def from_environment(cls, device: str = "cpu", backend: str | None = None,
                         timeout_s: float | None = None) -> DistributedContext:
        """The context ``torchrun`` describes in ``RANK`` / ``WORLD_SIZE`` (joining the
        process group), or a single process when they are absent. ``device``: where the
        model lives, ``cpu`` (backend ``gloo``) or ``cuda`` (backend ``nccl``, this process
        on GPU ``LOCAL_RANK``); ``backend`` overrides the choice. ``timeout_s`` bounds every
        collective: a rank that died makes the others fail with an error instead of hanging
        (default ``$PVTUNE_DIST_TIMEOUT`` or 1800 s: rank 0 may spend minutes writing a
        checkpoint while the others wait). ``torchrun`` itself stops every rank when one
        exits with an error."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if timeout_s is None:
            timeout_s = float(os.environ.get("PVTUNE_DIST_TIMEOUT", "1800"))
        if world <= 1:
            return cls()
        rank = int(os.environ.get("RANK", "0"))
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"device must be cpu or cuda, got {device!r}")
        if device == "cuda":
            if not torch.cuda.is_available():
                raise DistributedError(f"rank {rank} of {world}: device cuda was asked for "
                                       "but this machine has no CUDA GPU")
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        if not torch.distributed.is_initialized():
            backend = backend or ("gloo" if device == "cpu" else "nccl")
            try:
                torch.distributed.init_process_group(
                    backend, timeout=datetime.timedelta(seconds=timeout_s))
            except Exception as err:  # the store or a peer is unreachable
                raise DistributedError(f"rank {rank} of {world} could not join the process "
                                       f"group ({err}); check MASTER_ADDR / MASTER_PORT or "
                                       "the --rdzv-endpoint torchrun was given") from None
        return cls(torch.distributed.get_rank(), torch.distributed.get_world_size(), device)

    def shard(self, index: Tensor) -> Tensor:
        """This rank's contiguous part of a global micro-batch of sequence indices (every
        rank gets the same number, so averaged gradients equal the global batch's)."""
        if not self.active:
            return index
        if len(index) % self.world_size:
            raise ConfigError(f"a micro-batch of {len(index)} sequences cannot be split evenly "
                              f"across {self.world_size} processes: make the batch size a "
                              f"multiple of {self.world_size}")
        size = len(index) // self.world_size
        return index[self.rank * size:(self.rank + 1) * size]

    def average_(self, tensors: list[Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place (one flat all-reduce)."""
        self._mean_into(tensors, lambda flat: torch.distributed.all_reduce(flat), None)

    def reduce_(self, tensors: list[Tensor], dst: int) -> None:
        """Replace each tensor *on rank* ``dst`` by its mean over the ranks, in place (one
        flat reduce; the other ranks' tensors are left as they were)."""
        self._mean_into(tensors, lambda flat: torch.distributed.reduce(flat, dst=dst), dst)

    def _mean_into(self, tensors: list[Tensor], summing, dst: int | None) -> None:
        """Sum ``tensors`` flattened into one float32 buffer with the collective ``summing``
        and write the mean back (on every rank, or on ``dst`` only)."""
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
        self._collective(lambda: summing(flat))
        if dst is not None and self.rank != dst:
            return
        flat /= self.world_size
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].reshape(t.shape))
            offset += n

    def broadcast_(self, tensor: Tensor, src: int) -> None:
        """Replace ``tensor`` on every rank by rank ``src``'s, in place."""
        if self.active:
            self._collective(lambda: torch.distributed.broadcast(tensor, src=src))

    def sum_(self, tensor: Tensor) -> None:
        """Replace ``tensor`` by its sum over the ranks, in place."""
        if self.active:
            self._collective(lambda: torch.distributed.all_reduce(tensor))

    def gather_objects(self, obj, dst: int = 0) -> list | None:
        """Every rank's ``obj`` as a list by rank on rank ``dst`` (None elsewhere; pickled
        between processes of this run only)."""
        if not self.active:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        self._collective(lambda: torch.distributed.gather_object(obj, out, dst=dst))
        return out

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        self._collective(lambda: torch.distributed.all_reduce(t))
        return float(t) / self.world_size

    def broadcast_objects(self, objects: list, src: int) -> None:
        """Replace ``objects`` on every rank by rank ``src``'s, in place (pickled between
        processes of this run only)."""
        if self.active:
            self._collective(lambda: torch.distributed.broadcast_object_list(objects, src=src))

    def barrier(self) -> None:
        """Wait until every rank arrives."""
        if self.active:
            self._collective(torch.distributed.barrier)

    def close(self) -> None:
        """Leave the process group, every rank together (call once, after this rank's last
        collective): a barrier first, so no rank tears its connections down while another
        still uses them (a rank that waits here waits for rank 0 to finish writing)."""
        if self.active and torch.distributed.is_initialized():
            try:
                self.barrier()
            finally:
                torch.distributed.destroy_process_group()

    def _collective(self, call) -> None:
        try:
            call()
        except Exception as err:
            raise DistributedError(f"rank {self.rank} of {self.world_size}: a collective "
                                   f"failed ({type(err).__name__}: {err}); another rank has "
                                   "probably died, see its output") from None


def full_tensor(t: Tensor) -> Tensor:
    """The whole of ``t``: a sharded ``DTensor`` gathered from every rank (a collective: all
    ranks call it together), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def placed_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` split the way ``like`` is (this rank's shard, as a ``DTensor``) when ``like``
    is sharded; ``full`` itself otherwise. Every rank must hold the same ``full``."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or full.dim() == 0:
        return full
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def assign_layers(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """A deterministic partition of layers across ranks, balanced by size: largest first,
    each to the least loaded rank (the lowest on ties). Name -> owner rank."""
    load = [0] * world_size
    owner = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += sizes[name]
    return owner


__all__ = ["DistributedContext", "DistributedError", "assign_layers", "full_tensor",
           "placed_like"]
