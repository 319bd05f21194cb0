"""Calibration activations of a decoder: the inputs of each block (captured by stand-ins
for the blocks), replaying a block on them, and each linear's ``E[x x^T]``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from pvtune.llm.model import BlockStructure


class _Stop(Exception):
    """Raised by a recorder to end a forward pass early."""


class _Recorder(nn.Module):
    """Stands in for block ``index`` and records the arguments it is called with."""

    def __init__(self, index: int, sink: dict, stop_at: int) -> None:
        super().__init__()
        self.index, self.sink, self.stop_at = index, sink, stop_at

    def forward(self, hidden_states, *args, **kwargs):
        self.sink[self.index] = (hidden_states, args, kwargs)
        if self.index >= self.stop_at:
            raise _Stop
        return hidden_states


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is at most ``cap``."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def capture_block_inputs(
    model: nn.Module, structure: BlockStructure, ids: Tensor, batch_size: int
) -> tuple[Tensor, list[tuple[tuple, dict]]]:
    """Inputs of block 0 for every sequence (``[N, L, hidden]``) and, for each block, the
    extra arguments the model passes it for a mini-batch of ``batch_size`` sequences."""
    blocks = structure.blocks
    originals = list(blocks)
    sink: dict[int, tuple] = {}
    hidden = []
    try:
        for s in range(0, ids.shape[0], batch_size):
            stop_at = len(blocks) - 1 if s == 0 else 0
            for i in range(len(blocks)):
                blocks[i] = _Recorder(i, sink, stop_at)
            with torch.no_grad():
                try:
                    model(input_ids=ids[s : s + batch_size], use_cache=False)
                except _Stop:
                    pass
            hidden.append(sink[0][0].detach())
            if s == 0:
                extras = [(sink[i][1], sink[i][2]) for i in range(len(blocks))]
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return torch.cat(hidden), extras


def run_block(block: nn.Module, x: Tensor, extra: tuple[tuple, dict]) -> Tensor:
    """Apply a decoder block to hidden states ``x`` with the recorded extra arguments."""
    args, kwargs = extra
    out = block(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class XTXCollector:
    """Accumulates ``sum x x^T`` of every linear layer's inputs inside a module.

    Layers fed the same tensor (q/k/v, gate/up) share one product per forward call.
    """

    def __init__(self, module: nn.Module) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}
        # a layer behind an input quantizer (an online rotation, quantized activations)
        # multiplies what the quantizer hands it: that is the input its weight sees
        self._handles = [
            m.input_quantizer.register_forward_hook(self._output_hook(name))
            if getattr(m, "input_quantizer", None) is not None
            else m.register_forward_pre_hook(self._hook(name))
            for name, m in module.named_modules() if isinstance(m, nn.Linear)
        ]

    def _output_hook(self, name: str):
        accumulate = self._hook(name)
        return lambda module, inputs, output: accumulate(module, (output,))

    def _hook(self, name: str):
        def hook(module, inputs):
            x = inputs[0]
            # Share the product between layers fed the *same tensor object*. The cache holds
            # that tensor, so neither its id nor its memory can be reused by another input
            # during the call (keying by data_ptr alone once gave the MLP the attention's
            # inputs whenever the allocator reused the address: nondeterministic XTX).
            cached = self._cache.get(id(x))
            if cached is None or cached[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                cached = (x, flat.T @ flat)
                self._cache[id(x)] = cached
            prod = cached[1]
            self.sums[name] = self.sums[name] + prod if name in self.sums else prod.clone()
            self.counts[name] = self.counts.get(name, 0) + x.numel() // x.shape[-1]

        return hook

    def new_call(self) -> None:
        """Forget shared products (call before each forward pass)."""
        self._cache.clear()

    def xtx(self, name: str) -> Tensor:
        """``E[x x^T]`` of layer ``name``."""
        return self.sums[name] / max(1, self.counts[name])

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()


def minibatches(n: int, size: int) -> Iterator[slice]:
    """Slices of ``size`` consecutive items covering ``range(n)``."""
    for s in range(0, n, size):
        yield slice(s, s + size)
