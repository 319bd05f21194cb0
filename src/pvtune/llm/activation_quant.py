"""Activation and key/value-cache quantization of a causal LM, with rotations chosen per
layer (RoSTE's W/A/KV setting).

:func:`prepare_activation_quant_` makes a full-precision model compute with quantized
activations and a quantized KV cache, behind rotations that tame their outliers:

- **R1** (residual stream) and **R2** (per head, values and output projection) are folded
  into the weights (:func:`pvtune.rotation.rotate_model_`);
- **R4** rotates the down projection's input online, its weight multiplied by the same
  rotation offline; **R3** rotates queries and keys after RoPE online
  (:mod:`pvtune.llm.kv_quant`);
- every decoder linear (q/k/v/o/gate/up/down, whatever the architecture names them) gets a
  per-token activation quantizer at its input, every attention a per-head per-token key and
  value quantizer.

``rotations="adaptive"`` folds R1 and chooses R2, R3 and R4 per block, each on or off,
whichever gives the lower weight + activation quantization error (mean squared) on the
given samples: two forward passes, every choice off and every choice on, as RoSTE measures
it once before training. ``"on"`` and ``"off"`` (no rotation at all, R1 included) are there
to compare with. The weight error is that of per-output-channel asymmetric round-to-nearest
at ``weight_bits``; the weights themselves are left in full precision, to be quantized by
QAT, PV-Tuning or any pvtune representation (their layers keep the input quantizers).
With every bit width at 16 the prepared model computes the original logits (rotations
only; checked in the tests).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError, ModelError
from pvtune.llm.kv_quant import KVQuantizer, attach_kv_quantizers_, attention_modules
from pvtune.llm.model import find_blocks
from pvtune.nn.input_quantized_linear import InputQuantizedLinear
from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.nn.replace import set_submodule
from pvtune.nn.token_quant import TokenQuantConfig, TokenQuantizer, quantize_tokens
from pvtune.rotation.fold import RotationConfig, fold_problem, rotate_model_
from pvtune.rotation.hadamard import hadamard_factor
from pvtune.rotation.online import OnlineRotation

log = logging.getLogger(__name__)

ROTATION_MODES = ("adaptive", "on", "off")


@dataclass(frozen=True)
class ActivationKVConfig:
    """Quantized activations (``activations``) and KV cache (``kv_cache``), each a
    :class:`TokenQuantConfig` (16 bits: not quantized), behind rotations ``rotations``
    (``adaptive``, ``on``, ``off``; see the module docstring) drawn from ``seed``.
    ``weight_bits`` is the weight precision the adaptive choice assumes."""

    activations: TokenQuantConfig = field(default_factory=lambda: TokenQuantConfig(4, 0.95))
    kv_cache: TokenQuantConfig = field(default_factory=lambda: TokenQuantConfig(4, 0.95))
    rotations: str = "adaptive"
    weight_bits: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("activations", "kv_cache"):
            if not isinstance(getattr(self, name), TokenQuantConfig):
                raise ConfigError(f"ActivationKVConfig.{name} must be a TokenQuantConfig, "
                                  f"got {type(getattr(self, name)).__name__}")
        if self.rotations not in ROTATION_MODES:
            raise ConfigError(f"ActivationKVConfig.rotations must be one of "
                              f"{ROTATION_MODES}, got {self.rotations!r}")
        if not isinstance(self.weight_bits, int) or not 2 <= self.weight_bits <= 16:
            raise ConfigError(f"ActivationKVConfig.weight_bits must be an integer in "
                              f"[2, 16], got {self.weight_bits!r}")


@dataclass
class RotationChoice:
    """Which rotations a prepared model uses: R1 (``residual``) and, per decoder block, R2
    (``heads``), R3 (``queries_keys``) and R4 (``down``); with ``errors`` the measured
    weight + activation errors of each choice off and on (adaptive selection only)."""

    residual: bool
    heads: list[bool]
    queries_keys: list[bool]
    down: list[bool]
    errors: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    @classmethod
    def uniform(cls, blocks: int, on: bool) -> RotationChoice:
        """Every rotation on, or every rotation off."""
        return cls(on, [on] * blocks, [on] * blocks, [on] * blocks)

    def to_dict(self) -> dict:
        """JSON-ready record (a checkpoint keeps it)."""
        return asdict(self)

    def summary(self) -> str:
        """``R1 on, R2 12/30, R3 30/30, R4 4/30``."""
        def count(flags):
            return f"{sum(flags)}/{len(flags)}"
        return (f"R1 {'on' if self.residual else 'off'}, R2 {count(self.heads)}, "
                f"R3 {count(self.queries_keys)}, R4 {count(self.down)}")


def _block_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer inside a decoder block (dense or compressed), by qualified name."""
    structure = find_blocks(model)
    return {f"{structure.path}.{i}.{n}": m for i, block in enumerate(structure.blocks)
            for n, m in block.named_modules()
            if isinstance(m, nn.Linear | QuantizedLinear)}


def down_projections(model: nn.Module) -> list[str | None]:
    """Per decoder block, the MLP's output projection (its last linear outside attention
    that writes the residual stream; None where there is none)."""
    structure = find_blocks(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    attention = {id(m) for a in attention_modules(model).values() for m in a.modules()}
    out: list[str | None] = []
    for i, block in enumerate(structure.blocks):
        found = None
        for n, m in block.named_modules():
            if isinstance(m, nn.Linear | QuantizedLinear) and id(m) not in attention \
                    and m.out_features == hidden:
                found = f"{structure.path}.{i}.{n}"
        out.append(found)
    return out


def _set_input_quantizer(model: nn.Module, name: str, quantizer: nn.Module) -> None:
    layer = model.get_submodule(name)
    if hasattr(layer, "input_quantizer"):  # compressed, QAT or already input-quantized
        layer.input_quantizer = quantizer
    else:
        set_submodule(model, name, InputQuantizedLinear(layer, quantizer))


def _fold_down_rotations_(model: nn.Module, flags: list[bool], config: TokenQuantConfig,
                          seed: int) -> None:
    """R4 on the blocks in ``flags``: ``W R`` folded, the input rotated by ``R`` online."""
    for i, (flag, name) in enumerate(zip(flags, down_projections(model), strict=True)):
        if not flag or name is None:
            continue
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise ModelError(f"R4 folds into a full-precision down projection; {name} is a "
                             f"{type(layer).__name__} (prepare before compressing)")
        # each block's signs from its own seed: turning one block's rotation off leaves the
        # others' as they were (so choices compare rotations, not draws)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + 4_000 + i) % 2**63)
        rotation = OnlineRotation(layer.in_features, gen).to(layer.weight.device)
        with torch.no_grad():
            layer.weight.copy_(rotation.fold_into_reader(layer.weight))
        _set_input_quantizer(model, name, TokenQuantizer(config, rotation))


def _apply(model: nn.Module, config: ActivationKVConfig, choice: RotationChoice) -> None:
    blocks = len(find_blocks(model).blocks)
    if choice.residual or any(choice.heads):
        rotate_model_(model, RotationConfig(
            residual=choice.residual, heads=any(choice.heads), seed=config.seed,
            head_layers=tuple(i for i, f in enumerate(choice.heads) if f)))
    _fold_down_rotations_(model, choice.down, config.activations, config.seed)
    rotated_down = {n for f, n in zip(choice.down, down_projections(model), strict=True) if f}
    for name in _block_linears(model):
        if name not in rotated_down:
            _set_input_quantizer(model, name, TokenQuantizer(config.activations))
    attach_kv_quantizers_(model, config.kv_cache, rotate={
        i for i in range(blocks) if choice.queries_keys[i]}, seed=config.seed)


def _feasible(model: nn.Module, choice: RotationChoice) -> RotationChoice:
    """Turn off the rotations the model cannot take, with a warning: R1 and R2 where its
    structure refuses folding (norms on the residual branch), R3 and R4 where a size has no
    Hadamard matrix."""
    problem = fold_problem(model)
    if problem is not None and (choice.residual or any(choice.heads)):
        log.warning("R1 and R2 off: %s", problem)
        choice.residual, choice.heads = False, [False] * len(choice.heads)
    heads = {a.head_dim for a in attention_modules(model).values()}
    downs = down_projections(model)
    if any(hadamard_factor(h) is None for h in heads) and any(choice.queries_keys):
        log.warning("no Hadamard matrix of the head size %s: R3 off", sorted(heads))
        choice.queries_keys = [False] * len(choice.queries_keys)
    for i, name in enumerate(downs):
        if choice.down[i] and (name is None or hadamard_factor(
                model.get_submodule(name).in_features) is None):
            choice.down[i] = False
    return choice


def _weight_error(weight: Tensor, bits: int) -> float:
    """Mean squared error of per-output-channel asymmetric round-to-nearest."""
    w = weight.detach().float()
    return float((quantize_tokens(w, bits) - w).pow(2).mean())


def _measure(model: nn.Module, config: ActivationKVConfig, choice: RotationChoice,
             samples: Tensor, batch_size: int) -> list[dict[str, float]]:
    """Per block, the errors each rotation affects, on a copy of ``model`` prepared with
    ``choice``: R2 (the value projection's and output projection's weights, the output
    projection's input, the values), R3 (the keys) and R4 (the down projection's weight and
    input)."""
    work = copy.deepcopy(model)
    _apply(work, config, choice)
    quantizers = [m for m in work.modules() if isinstance(m, TokenQuantizer | KVQuantizer)]
    for q in quantizers:
        q.record = True
    with torch.no_grad():
        for start in range(0, samples.shape[0], batch_size):
            work(input_ids=samples[start:start + batch_size], use_cache=False)
    attention = list(attention_modules(work).values())
    downs = down_projections(work)
    out = []
    for i, attn in enumerate(attention):
        kv = attn.kv_quantizer
        entry = {"keys": kv.key_error / max(kv.count, 1)}
        heads = kv.value_error / max(kv.count, 1)
        for part in ("v_proj", "o_proj"):
            layer = getattr(attn, part, None)
            if layer is not None:
                heads += _weight_error(layer.weight, config.weight_bits)
        o_quant = attn.o_proj.input_quantizer
        heads += o_quant.squared_error / max(o_quant.count, 1)
        entry["heads"] = heads
        if downs[i] is not None:
            down = work.get_submodule(downs[i])
            q = down.input_quantizer
            entry["down"] = (_weight_error(down.weight, config.weight_bits)
                             + q.squared_error / max(q.count, 1))
        out.append(entry)
    return out


def runtime_quantization(model: nn.Module) -> str | None:
    """What ``model`` computes at run time beyond its weights (quantized activations or KV
    cache, online rotations, any layer's input quantizer), in words; None for nothing."""
    found = []
    if any(isinstance(m, KVQuantizer) for m in model.modules()):
        found.append("a quantized KV cache")
    inputs = [m for m in model.modules() if getattr(m, "input_quantizer", None) is not None]
    if inputs:
        found.append(f"input quantizers on {len(inputs)} layers")
    if any(isinstance(m, OnlineRotation) for m in model.modules()):
        found.append("online rotations")
    return ", ".join(found) or None


def select_rotations(model: nn.Module, config: ActivationKVConfig, samples: Tensor,
                     batch_size: int = 8) -> RotationChoice:
    """RoSTE's adaptive choice (module docstring): R1 on (where the model allows it); per
    block, R2, R3 and R4 each on where the measured error with every rotation on is below
    the error with every one off.
    ``samples``: token ids ``[n, length]`` (RoSTE: 128 training samples)."""
    if samples.dim() != 2 or samples.shape[0] == 0:
        raise ConfigError(f"select_rotations needs token ids of shape [n, length], got "
                          f"{tuple(samples.shape)}")
    blocks = len(find_blocks(model).blocks)
    on = _feasible(model, RotationChoice.uniform(blocks, True))
    off = RotationChoice(on.residual, [False] * blocks, [False] * blocks, [False] * blocks)
    samples = samples.to(model.get_input_embeddings().weight.device)
    measured_off = _measure(model, config, off, samples, batch_size)
    measured_on = _measure(model, config, on, samples, batch_size)
    choice = RotationChoice(on.residual, [], [], [],
                            errors={"off": measured_off, "on": measured_on})
    for i in range(blocks):
        e_off, e_on = measured_off[i], measured_on[i]
        choice.heads.append(on.heads[i] and e_on["heads"] < e_off["heads"])
        choice.queries_keys.append(on.queries_keys[i] and e_on["keys"] < e_off["keys"])
        choice.down.append(on.down[i] and "down" in e_on and e_on["down"] < e_off["down"])
    log.info("rotations chosen per block: %s", choice.summary())
    return choice


def prepare_activation_quant_(model: nn.Module, config: ActivationKVConfig,
                              samples: Tensor | None = None,
                              choice: RotationChoice | None = None) -> RotationChoice:
    """Quantize ``model``'s activations and KV cache in place behind the rotations of
    ``config`` (``samples`` needed for ``adaptive``; ``choice`` overrides the selection);
    returns the rotations used. The model's linears must still be full precision where a
    rotation is folded into them."""
    if any(isinstance(m, TokenQuantizer | KVQuantizer) for m in model.modules()):
        raise ConfigError("the model already has activation or key/value quantizers")
    blocks = len(find_blocks(model).blocks)
    if choice is None:
        if config.rotations == "adaptive":
            if samples is None:
                raise ConfigError("adaptive rotation selection needs samples (token ids)")
            choice = select_rotations(model, config, samples)
        else:
            choice = _feasible(model, RotationChoice.uniform(blocks,
                                                                config.rotations == "on"))
    elif not (len(choice.heads) == len(choice.queries_keys) == len(choice.down) == blocks):
        raise ConfigError(f"the rotation choice covers {len(choice.heads)} blocks; the model "
                          f"has {blocks}")
    _apply(model, config, choice)
    log.info("activations %d-bit, KV cache %d-bit; rotations: %s", config.activations.bits,
             config.kv_cache.bits, choice.summary())
    return choice
