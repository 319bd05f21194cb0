"""Training in the precision a checkpoint stores: fp32 master copies, rounded parameters.

A compressed model stores its continuous parameters as float16 (the representations' scales
and codebooks always; embeddings, norms and the head when the model's dense storage is
``float16``). Fine-tuning keeps every such parameter equal to a float16 value, so the model
that is evaluated during training is the model that is saved, and its bits per parameter do
not grow. Updates smaller than float16's spacing are not lost: the optimizer updates an fp32
master copy, and the parameter holds the master rounded to float16.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from pvtune.distributed import placed_like
from pvtune.errors import ConfigError
from pvtune.nn.quantize import quantized_layers

DENSE_STORAGE = ("float16", "float32")


def storage_dtypes(model: nn.Module, dense_storage: str = "float16") -> dict[str, torch.dtype]:
    """Parameter name -> the dtype it is stored in, for every parameter stored narrower than
    it is held: the compressed layers' continuous parameters (float16) and, with
    ``dense_storage="float16"``, every other floating parameter."""
    if dense_storage not in DENSE_STORAGE:
        raise ConfigError(f"dense_storage must be one of {DENSE_STORAGE}, got {dense_storage!r}")
    quantized = {id(p) for m in quantized_layers(model).values() for p in m.qweight.parameters()}
    out = {}
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.dtype == torch.float16:
            continue
        if id(p) in quantized or dense_storage == "float16":
            out[name] = torch.float16
    return out


class StoredPrecision:
    """Keeps the named parameters of ``model`` at their storage precision around each
    optimizer step (see the module docstring). Rounds them on construction."""

    def __init__(self, model: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
        params = dict(model.named_parameters())
        unknown = sorted(set(dtypes) - set(params))
        if unknown:
            raise ConfigError(f"StoredPrecision: the model has no parameter(s) {unknown[:5]}")
        self.entries: dict[str, tuple[nn.Parameter, torch.dtype, Tensor]] = {
            name: (params[name], dtype, params[name].detach().clone())
            for name, dtype in dtypes.items()
        }
        self._round()

    def _round(self) -> None:
        with torch.no_grad():
            for p, dtype, master in self.entries.values():
                p.copy_(master.to(dtype).to(p.dtype))

    @contextmanager
    def master_weights(self) -> Iterator[None]:
        """Inside: parameters hold their fp32 masters (for the optimizer to update); on exit
        the masters take the updated values and the parameters are rounded again."""
        with torch.no_grad():
            for p, _, master in self.entries.values():
                p.copy_(master)
        yield
        with torch.no_grad():
            for p, _, master in self.entries.values():
                master.copy_(p)
        self._round()

    def state_tensors(self) -> dict[str, Tensor]:
        """The master copies by parameter name (for resuming bit-exactly)."""
        return {name: master for name, (_, _, master) in self.entries.items()}

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_tensors`; rounds the parameters from the loaded masters."""
        missing = sorted(set(self.entries) - set(tensors))
        if missing:
            raise ConfigError(f"resume state lacks the master copies of {missing[:5]}")
        with torch.no_grad():
            for name, (_, _, master) in self.entries.items():
                master.copy_(placed_like(tensors[name], master))
        self._round()
