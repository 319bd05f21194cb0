"""A size budget spent where it matters: each tensor's storage type chosen from measurements.

Every decoder linear and the token embedding table (with a head tied to it; an untied head
on its own) is a candidate for each storage type in :attr:`BudgetConfig.types` that fits its
shape (the GGUF block types and ``f16``). The loss increase of storing tensor ``t`` in type
``k`` alone is estimated from the diagonal Fisher information of the model's next-token loss
on calibration text::

    cost[t, k] = 1/2 * sum_i F_i * (decode_k(W_t) - W_t)_i^2,   F = E[(dL/dW)^2]

(``decode_k`` the type's round-to-nearest fit, the squared gradients taken one calibration
sequence at a time). :func:`allocate` then picks one type per tensor to minimise the summed
cost within the byte budget: a multiple-choice knapsack, solved exactly by dynamic
programming over bytes. The budget counts the
file llama.cpp would load: every tensor's bytes, the norms in float32 and the metadata.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pvtune.errors import ConfigError
from pvtune.llm.model import find_blocks
from pvtune.reprs.base import ReprConfig, check_int, check_range, round_to_fp16
from pvtune.reprs.gguf_block import (
    BLOCK_FORMATS,
    GGUFBlockConfig,
    decode_codes,
    fit_block_grid,
    round_to_codes,
)

log = logging.getLogger(__name__)

DENSE = "f16"  # the one dense storage type: float16 values, 2 bytes per weight
# q1_0 and tq2_0 fit only rows whose width is a multiple of 128 and 256 (SmolLM2: the down
# projections); they let a tight budget keep its embedding table out of q2_0
DEFAULT_TYPES = ("q1_0", "tq2_0", "q2_0", "q4_0", "q4_1", "q8_0", DENSE)
# a float16 table is never worth its bytes next to q8_0 at the sizes a budget is for
DEFAULT_EMBEDDING_TYPES = ("q2_0", "q4_0", "q4_1", "q8_0")
EMBEDDINGS = "embeddings"  # the key of the token embedding table (and a tied head)
HEAD = "head"  # the key of an untied output head
# per tensor in a GGUF file beyond its data: its info record and the alignment padding
# (a bound: name, up to 4 dimensions, type, offset, 32-byte alignment)
GGUF_TENSOR_OVERHEAD = 96 + 32

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``60MiB``, ``59.5 MB``, ``62914560`` or ``1.2GiB`` (``MiB`` =
    2^20 bytes, ``MB`` = 10^6 bytes); a :class:`ConfigError` for anything else."""
    match = _SIZE.match(str(text))
    unit = (match.group(2) or "").lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"cannot read the size {text!r}: write a number with an optional unit "
                          "(B, KB, KiB, MB, MiB, GB, GiB), e.g. 60MiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ConfigError(f"the size {text!r} must be positive")
    return value


@dataclass(frozen=True)
class BudgetConfig:
    """How big the compressed file may be and what each tensor may be stored as.

    Exactly one of ``target_bytes`` (the whole file, metadata included) and ``target_bits``
    (bits per model parameter over that file) is set. ``types`` lists the candidate storage
    types of the decoder linears, ``embedding_types`` those of the embedding table (and an
    untied head); a tensor takes only the types its shape fits. ``sequences`` calibration
    sequences estimate the Fisher information (one backward pass each).
    """

    target_bytes: int | None = None
    target_bits: float | None = None
    types: tuple[str, ...] = DEFAULT_TYPES
    embedding_types: tuple[str, ...] = DEFAULT_EMBEDDING_TYPES
    sequences: int = 8

    def __post_init__(self) -> None:
        if (self.target_bytes is None) == (self.target_bits is None):
            raise ConfigError("BudgetConfig needs exactly one of target_bytes and target_bits")
        if self.target_bytes is not None:
            check_int(self, "target_bytes", self.target_bytes)
            check_range(self, "target_bytes", self.target_bytes, 1, None)
        if self.target_bits is not None:
            check_range(self, "target_bits", self.target_bits, 0.01, 32.0)
        check_int(self, "sequences", self.sequences)
        check_range(self, "sequences", self.sequences, 1, None)
        for name in ("types", "embedding_types"):
            types = tuple(getattr(self, name))
            object.__setattr__(self, name, types)
            if not types:
                raise ConfigError(f"BudgetConfig.{name} is empty: give at least one type")
            unknown = [t for t in types if t != DENSE and t not in BLOCK_FORMATS]
            if unknown:
                raise ConfigError(f"BudgetConfig.{name}: unknown storage types {unknown}; "
                                  f"known: {sorted(BLOCK_FORMATS) + [DENSE]}")

    @classmethod
    def for_types(cls, target_bytes: int | None = None, target_bits: float | None = None,
                  types: tuple[str, ...] | None = None, sequences: int = 8) -> BudgetConfig:
        """A budget whose tensors may take ``types`` (None: :data:`DEFAULT_TYPES`, with
        :data:`DEFAULT_EMBEDDING_TYPES` for the embeddings); the embeddings take the block
        types among ``types`` (all of them when it holds no block type)."""
        if types is None:
            return cls(target_bytes=target_bytes, target_bits=target_bits, sequences=sequences)
        types = tuple(types)
        blocks = tuple(t for t in types if t != DENSE)
        return cls(target_bytes=target_bytes, target_bits=target_bits, types=types,
                   embedding_types=blocks or types, sequences=sequences)

    def budget_bytes(self, params: int) -> int:
        """The byte budget for a model of ``params`` parameters."""
        if self.target_bytes is not None:
            return self.target_bytes
        return int(self.target_bits * params / 8)


def type_config(type_name: str) -> ReprConfig | None:
    """The representation of a storage type (None for ``f16``: the tensor stays dense)."""
    return None if type_name == DENSE else GGUFBlockConfig(type_name)


def type_bytes(type_name: str, out_features: int, in_features: int) -> int:
    """Bytes of an ``[out, in]`` tensor stored as ``type_name``."""
    if type_name == DENSE:
        return 2 * out_features * in_features
    fmt = BLOCK_FORMATS[type_name]
    return out_features * (in_features // fmt.block_size) * fmt.type_size


def fits(type_name: str, in_features: int) -> bool:
    """Whether rows of ``in_features`` weights can be stored as ``type_name``."""
    return type_name == DENSE or in_features % BLOCK_FORMATS[type_name].block_size == 0


def rounding_error(weight: Tensor, type_name: str, ratios: int = 8) -> Tensor:
    """``decode(encode(W)) - W`` for ``type_name``: pvtune's round-to-nearest fit of each
    block's scale, searched over ``ratios`` shrink factors (a coarser search than
    compression's; the estimate only ranks the types)."""
    w = weight.detach().to(torch.float32)
    if type_name == DENSE:
        return round_to_fp16(w) - w
    fmt = BLOCK_FORMATS[type_name]
    grouped = w.reshape(w.shape[0], -1, fmt.block_size)
    with torch.no_grad():
        d, m = fit_block_grid(grouped, fmt, ratios=ratios)
        d, m = d.unsqueeze(-1), m.unsqueeze(-1)
        q = round_to_codes(grouped, d, m, fmt)
        return (decode_codes(q, d, m, fmt) - grouped).reshape(w.shape)


@dataclass
class TensorOptions:
    """One tensor the budget decides: its module names, shape, and per type its bytes and
    estimated loss increase."""

    key: str
    modules: tuple[str, ...]
    out_features: int
    in_features: int
    bytes: dict[str, int] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)


@dataclass
class BudgetPlan:
    """The chosen type of every tensor, with what the budget counted."""

    types: dict[str, str]
    budget_bytes: int
    fixed_bytes: int
    tensor_bytes: int
    estimated_cost: float
    options: dict[str, TensorOptions] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Bytes of the file this plan makes (tensors plus fixed part)."""
        return self.fixed_bytes + self.tensor_bytes

    def layer_types(self) -> dict[str, str]:
        """``{module name: type}`` for every module the plan covers (a tied head included)."""
        return {m: self.types[k] for k, o in self.options.items() for m in o.modules}

    def summary(self) -> dict[str, int]:
        """How many tensors took each type."""
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        return dict(sorted(counts.items()))

    def to_dict(self) -> dict:
        """JSON-ready record (the checkpoint keeps it)."""
        return {"budget_bytes": self.budget_bytes, "fixed_bytes": self.fixed_bytes,
                "tensor_bytes": self.tensor_bytes, "total_bytes": self.total_bytes,
                "estimated_cost": self.estimated_cost, "types": dict(self.types),
                "counts": self.summary()}


def budget_tensors(model: nn.Module) -> dict[str, tuple[tuple[str, ...], nn.Module]]:
    """``{key: (module names, module)}`` of every tensor a budget decides: each decoder
    linear by its name, the embedding table (``embeddings``, with a tied head) and an
    untied head (``head``)."""
    structure = find_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, tuple[tuple[str, ...], nn.Module]] = {}
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", 0)
    if isinstance(emb, nn.Embedding):
        out[EMBEDDINGS] = ((names[id(emb)], names[id(head)]) if tied
                           else (names[id(emb)],), emb)
    if isinstance(head, nn.Linear) and not tied:
        out[HEAD] = ((names[id(head)],), head)
    for i, block in enumerate(structure.blocks):
        for lname in structure.linear_names(i):
            full = f"{structure.path}.{i}.{lname}"
            out[full] = ((full,), block.get_submodule(lname))
    return out


def fixed_bytes(model: nn.Module, keys: dict[str, tuple[tuple[str, ...], nn.Module]],
                metadata_bytes: int) -> int:
    """What the file holds besides the budgeted tensors: every other parameter as float32
    (norms, biases), the metadata and each tensor's info record and padding."""
    budgeted = {id(m.weight) for _, m in keys.values()}
    params = {id(p): p for p in model.parameters()}
    rest = [p for i, p in params.items() if i not in budgeted]
    return (4 * sum(p.numel() for p in rest) + metadata_bytes
            + GGUF_TENSOR_OVERHEAD * (len(rest) + len(keys)))


def fisher_diagonal(model: nn.Module, ids: Tensor, weights: list[Tensor],
                    progress: bool = True) -> list[Tensor]:
    """``E[(dL/dW)^2]`` of each tensor in ``weights`` over the sequences of ``ids``
    (``[N, L]``), ``L`` the mean next-token cross-entropy of one sequence."""
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        for row in tqdm(ids, desc="sensitivity", disable=not progress, unit="seq"):
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=row[None], use_cache=False).logits[0, :-1]
            loss = F.cross_entropy(logits.float(), row[1:])
            grads = torch.autograd.grad(loss, weights)
            for s, g in zip(sums, grads, strict=True):
                s.add_(g.float().pow(2))
    finally:
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        model.train(was_training)
    return [s / ids.shape[0] for s in sums]


def measure_options(model: nn.Module, ids: Tensor, config: BudgetConfig,
                    progress: bool = True) -> dict[str, TensorOptions]:
    """Bytes and estimated loss increase of every budgeted tensor in every type it fits
    (see the module docstring)."""
    keys = budget_tensors(model)
    modules = {k: m for k, (_, m) in keys.items()}
    fisher = fisher_diagonal(model, ids[: config.sequences], [m.weight for m in modules.values()],
                             progress)
    options = {}
    bar = tqdm(total=len(keys), desc="rounding errors", disable=not progress, unit="tensor")
    for (key, (names, module)), f in zip(keys.items(), fisher, strict=True):
        out_f, in_f = module.weight.shape
        types = config.embedding_types if key in (EMBEDDINGS, HEAD) else config.types
        opt = TensorOptions(key, names, out_f, in_f)
        for t in types:
            if fits(t, in_f):
                opt.bytes[t] = type_bytes(t, out_f, in_f)
                opt.cost[t] = 0.5 * float((f * rounding_error(module.weight, t).pow(2)).sum())
        if not opt.bytes:
            raise ConfigError(f"no storage type among {list(types)} fits {key} ({out_f}x{in_f}); "
                              "add f16 or a type with blocks dividing its width")
        options[key] = opt
        bar.update()
    bar.close()
    return options


DP_BINS = 1 << 18  # byte resolution of the allocation: the largest possible upgrade / this


def allocate(options: dict[str, TensorOptions], budget_bytes: int,
             fixed: int = 0) -> BudgetPlan:
    """One type per tensor minimising the summed estimated cost with ``fixed`` plus the
    tensors' bytes at most ``budget_bytes``: the multiple-choice knapsack solved exactly by
    dynamic programming over the bytes above each tensor's smallest type, counted in units
    of ``ceil(all upgrades / DP_BINS)`` bytes rounded up (so the file never exceeds the
    budget, and a larger budget never gets a higher estimated cost). Exact where a greedy
    by cost saved per byte is not: one large upgrade (an embedding table) can be worth more
    than the many small ones that would leave no room for it. A :class:`ConfigError` when
    even the smallest types do not fit."""
    keys = list(options)
    types = {k: sorted(options[k].bytes, key=lambda t: (options[k].bytes[t], options[k].cost[t]))
             for k in keys}
    smallest = {k: types[k][0] for k in keys}
    used = fixed + sum(options[k].bytes[smallest[k]] for k in keys)
    if used > budget_bytes:
        raise ConfigError(
            f"the budget of {budget_bytes / 2**20:.2f} MiB is below the smallest file these "
            f"storage types make ({used / 2**20:.2f} MiB); raise it or allow smaller types")
    extra = {k: [options[k].bytes[t] - options[k].bytes[smallest[k]] for t in types[k]]
             for k in keys}
    # the unit depends on the options only, not on the budget: budgets compare exactly
    unit = max(1, math.ceil(sum(max(e) for e in extra.values()) / DP_BINS))
    capacity = min((budget_bytes - used) // unit,
                   sum(math.ceil(max(e) / unit) for e in extra.values()))
    best = np.zeros(capacity + 1)  # least cost of the tensors so far within c units
    picks = np.zeros((len(keys), capacity + 1), dtype=np.int8)
    for i, k in enumerate(keys):
        new = np.full(capacity + 1, np.inf)
        for j, (t, e) in enumerate(zip(types[k], extra[k], strict=True)):
            w = math.ceil(e / unit)
            if w > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[w:] = best[: capacity + 1 - w] + options[k].cost[t]
            better = cand < new
            new[better], picks[i, better] = cand[better], j
        best = new
    choice, c = {}, int(np.argmin(best))  # the least cost may need less than all units
    for i in range(len(keys) - 1, -1, -1):
        k = keys[i]
        j = int(picks[i, c])
        choice[k] = types[k][j]
        c -= math.ceil(extra[k][j] / unit)
    choice = {k: choice[k] for k in keys}  # in the model's order, as recorded
    tensor_bytes = sum(options[k].bytes[t] for k, t in choice.items())
    cost = sum(options[k].cost[t] for k, t in choice.items())
    return BudgetPlan(choice, budget_bytes, fixed, tensor_bytes, cost, options)


def plan_budget(model: nn.Module, ids: Tensor, config: BudgetConfig, metadata_bytes: int = 0,
                progress: bool = True,
                options: dict[str, TensorOptions] | None = None) -> BudgetPlan:
    """Measure every tensor's options on calibration ``ids`` and allocate the budget
    (``metadata_bytes``: the file's metadata, counted in the fixed part). ``options`` from an
    earlier :func:`measure_options` of the same model skips the measurement (one
    measurement, many budgets)."""
    from pvtune.llm.model import count_params

    keys = budget_tensors(model)
    fixed = fixed_bytes(model, keys, metadata_bytes)
    budget = config.budget_bytes(count_params(model))
    if options is None:
        options = measure_options(model, ids, config, progress)
    elif set(options) != set(keys):
        raise ConfigError("the given sensitivities describe other tensors than this model's "
                          "(measure them on the model being compressed)")
    plan = allocate(options, budget, fixed)
    log.info("budget %.2f MiB: %s, %.2f MiB of tensors + %.2f MiB fixed", budget / 2**20,
             plan.summary(), plan.tensor_bytes / 2**20, plan.fixed_bytes / 2**20)
    return plan
