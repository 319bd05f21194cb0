"""Key/value-cache quantization and the online query/key rotation (SpinQuant's R3).

:class:`KVQuantizer` sits on an attention module as ``kv_quantizer``. Transformers' attention
modules hand queries, keys and values (keys after RoPE) to an attention function chosen by
the model config's ``_attn_implementation``; pvtune registers two (``pvtune_kv``,
``pvtune_kv_eager``) that pass them through the module's quantizer, then run PyTorch's
scaled-dot-product attention or, for a model configured for eager attention, the model's
own.
Keys and values are quantized per token and per head (:func:`quantize_tokens` over the head
dimension), after an optional Hadamard rotation ``R`` of queries and keys (``q R (k R)^T =
q k^T``, so the rotation alone changes nothing). The cache itself keeps the unquantized
keys and values: a token's quantized key depends on that token alone, so quantizing every
cached key at every step gives what storing quantized keys would, and generation with a
cache computes what a full forward pass computes.

Nothing is written per architecture; :func:`attach_kv_quantizers_` runs one forward pass and
refuses a model whose attention does not go through the attention interface.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn

from pvtune.errors import CheckpointError, ModelError
from pvtune.llm.model import find_blocks
from pvtune.nn.attached import register_attached
from pvtune.nn.replace import set_submodule
from pvtune.nn.token_quant import TokenQuantConfig, quantize_tokens
from pvtune.rotation.online import OnlineRotation

# pvtune's attention implementations, by the implementation they run after quantizing:
# PyTorch's SDPA, or the model's own eager attention (for features SDPA lacks, such as
# Gemma-2's logit soft-capping)
IMPLEMENTATIONS = {"sdpa": "pvtune_kv", "eager": "pvtune_kv_eager"}


def _quantized(module: nn.Module, query: Tensor, key: Tensor, value: Tensor):
    quantizer = getattr(module, "kv_quantizer", None)
    return (query, key, value) if quantizer is None else quantizer(query, key, value)


def _sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                    attention_mask: Tensor | None, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, *_quantized(module, query, key, value),
                                          attention_mask, **kwargs)


def _eager_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, **kwargs):
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ModelError(f"{type(module).__name__} has no eager attention function to run "
                         "after key/value quantization")
    return eager(module, *_quantized(module, query, key, value), attention_mask, **kwargs)


def register_attention_implementations() -> None:
    """Make pvtune's attention implementations known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base, name in IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _sdpa_attention if base == "sdpa"
                                    else _eager_attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


def _use_implementation(model: nn.Module) -> None:
    register_attention_implementations()
    for config in {id(c): c for c in (model.config, getattr(model.config, "text_config", None))
                   if c is not None}.values():
        current = config._attn_implementation
        if current not in IMPLEMENTATIONS.values():
            config._attn_implementation = IMPLEMENTATIONS[
                "eager" if current == "eager" else "sdpa"]


@register_attached("kv_cache")
class KVQuantizer(nn.Module):
    """Quantizes an attention module's keys and values per token and head with ``config``,
    after rotating queries and keys by ``rotation`` (R3) when given. ``record`` accumulates
    the keys' and values' squared quantization error (``key_error``, ``value_error``, over
    ``count`` values each)."""

    def __init__(self, config: TokenQuantConfig, head_dim: int,
                 rotation: OnlineRotation | None = None) -> None:
        super().__init__()
        if rotation is not None and rotation.size != head_dim:
            raise ModelError(f"KVQuantizer: a rotation of size {rotation.size} cannot rotate "
                             f"heads of size {head_dim}")
        self.config = config
        self.head_dim = head_dim
        self.rotation = rotation
        self.record = False
        self.calls = 0
        self.key_error = self.value_error = 0.0
        self.count = 0

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.calls += 1
        if self.rotation is not None:
            query, key = self.rotation(query), self.rotation(key)
        if not self.config.enabled:
            return query, key, value
        qk = quantize_tokens(key, self.config.bits, self.config.clip)
        qv = quantize_tokens(value, self.config.bits, self.config.clip)
        if self.record:
            with torch.no_grad():
                self.key_error += float((qk - key).double().pow(2).sum())
                self.value_error += float((qv - value).double().pow(2).sum())
                self.count += key.numel()
        return query, qk, qv

    def to_spec(self) -> dict[str, Any]:
        """A checkpoint's record (the rotation's signs are in the state dict)."""
        return {**asdict(self.config), "head_dim": self.head_dim,
                "rotation": self.rotation is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> KVQuantizer:
        """The quantizer a checkpoint record describes."""
        try:
            head_dim = int(spec["head_dim"])
            return cls(TokenQuantConfig(bits=spec["bits"], clip=spec["clip"]), head_dim,
                       OnlineRotation(head_dim) if spec["rotation"] else None)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"bad key/value quantizer record {spec!r}: {err}") from None

    @staticmethod
    def install(model: nn.Module, name: str, module: KVQuantizer) -> None:
        """Put ``module`` at ``name`` (an attention module's ``kv_quantizer``) and route the
        model's attention through it."""
        parent, _, child = name.rpartition(".")
        try:
            model.get_submodule(parent)
        except AttributeError:
            raise CheckpointError(f"the key/value quantizer {name!r} has no attention module "
                                  "to sit on in this model (another architecture?)") from None
        if child != "kv_quantizer":
            raise CheckpointError(f"a key/value quantizer must be named 'kv_quantizer', got "
                                  f"{name!r}")
        set_submodule(model, name, module)
        _use_implementation(model)

    def extra_repr(self) -> str:
        return (f"bits={self.config.bits}, clip={self.config.clip}, "
                f"rotation={self.rotation is not None}")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Each decoder block's attention module (the child with an ``o_proj`` and a
    ``head_dim``), by qualified name, in block order."""
    structure = find_blocks(model)
    out = {}
    for i, block in enumerate(structure.blocks):
        for child_name, child in block.named_children():
            if hasattr(child, "o_proj") and isinstance(getattr(child, "head_dim", None), int):
                out[f"{structure.path}.{i}.{child_name}"] = child
                break
    return out


def attach_kv_quantizers_(model: nn.Module, config: TokenQuantConfig,
                          rotate: set[int] | None = None, seed: int = 0) -> dict[str, KVQuantizer]:
    """Attach a :class:`KVQuantizer` of ``config`` to every block's attention (R3 on the
    blocks in ``rotate``, by index; None: none), route attention through them, and check with
    one forward pass that every one is used; returns them by name. A :class:`ModelError`
    (model unchanged) for an architecture whose attention bypasses the interface."""
    attention = attention_modules(model)
    if not attention:
        raise ModelError(f"{type(model).__name__}: no attention module with o_proj and head_dim "
                         "found: key/value quantization does not apply to it")
    previous = model.config._attn_implementation
    made = {}
    for i, (name, attn) in enumerate(attention.items()):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + 3_000 + i) % 2**63)  # per block
        rotation = OnlineRotation(attn.head_dim, gen) if rotate and i in rotate else None
        device = next(attn.parameters()).device
        made[f"{name}.kv_quantizer"] = KVQuantizer(config, attn.head_dim, rotation).to(device)
    for name, module in made.items():
        KVQuantizer.install(model, name, module)
    emb = model.get_input_embeddings()
    ids = torch.arange(4, device=emb.weight.device).remainder(emb.weight.shape[0])[None]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    unused = [n for n, m in made.items() if m.calls == 0]
    if unused:
        detach_kv_quantizers_(model)
        model.config._attn_implementation = previous
        raise ModelError(f"{type(model).__name__}'s attention does not go through transformers' "
                         f"attention interface ({unused[0]} was never called): key/value "
                         "quantization does not apply to it")
    for m in made.values():
        m.calls = 0
    return made


def detach_kv_quantizers_(model: nn.Module) -> None:
    """Remove every key/value quantizer (attention keeps pvtune's route, which without them
    is the attention it wraps)."""
    for name in [n for n, m in model.named_modules() if isinstance(m, KVQuantizer)]:
        parent, _, child = name.rpartition(".")
        delattr(model.get_submodule(parent), child)
