"""FSDP2 sharding of the continuous parameters (``pvtune finetune --shard`` under torchrun).

``torch.distributed.fsdp.fully_shard`` is applied to every decoder block and to the whole
model: each rank stores 1/N of every continuous parameter (scales, codebooks, embeddings,
norms) and of its Adam state; FSDP gathers a block's parameters for its forward and backward
and reduce-scatters (averages) their gradients. The codes are buffers, not parameters, so
FSDP leaves them whole on every rank and the discrete step changes them in place.

Outside forward and backward the discrete step, saving and the resume state need whole
parameters: :func:`full_parameters` gathers them (every rank enters it together).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from pvtune.distributed import DistributedContext
from pvtune.llm.model import find_blocks


def shard_model(model: nn.Module, dist: DistributedContext) -> None:
    """Shard ``model``'s parameters across the ranks of ``dist`` with FSDP2, in place: one
    FSDP unit per decoder block, the rest (embeddings, final norm, head) in the root unit."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device.type
    mesh = init_device_mesh(device, (dist.world_size,))
    for block in find_blocks(model).blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP shards any part of ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Inside, every parameter of a sharded ``model`` is whole on every rank: for the
    discrete step, for saving (``state_dict()`` returns whole tensors) and for reading the
    decoded weights. A collective: all ranks enter it together. Parameters changed inside
    are not written back (only codes, which are buffers, may change). No-op when unsharded.
    """
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        yield
        return
    for m in modules:
        m.unshard()
    groups = [g for m in modules for g in m._get_fsdp_state()._fsdp_param_groups]
    # FSDP's state_dict hooks would swap the sharded parameters back in for saving
    for g in groups:
        for handles in (g._module_to_pre_save_state_dict_hook_handle,
                        g._module_to_pre_load_state_dict_hook_handle):
            for handle in handles.values():
                handle.remove()
            handles.clear()
    try:
        yield
    finally:
        for g in groups:
            g._register_state_dict_hooks()
        for m in modules:
            m.reshard()


__all__ = ["full_parameters", "is_sharded", "shard_model"]
