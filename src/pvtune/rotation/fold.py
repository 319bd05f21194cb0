"""Rotations folded into a causal LM's weights: the same function, weights easier to quantize.

**R1** rotates the residual stream by an orthogonal ``Q`` (QuaRot, SpinQuant): every RMSNorm
that reads the stream has its scale folded into the linears that read its output and is set
to unit scale (an RMSNorm without scale commutes with ``Q``); then the token embeddings
become ``E Q``, every linear reading the stream (q/k/v, gate/up, the head) ``W Q`` and
every linear writing it (o, down) ``Q^T W`` (and its bias ``Q^T b``). **R2** rotates each
attention head's values by an orthogonal ``H`` of the head size: ``v_proj`` becomes
``H^T W_v`` per head and ``o_proj`` ``W_o H`` per head (all heads share ``H``, so grouped
key-value heads stay consistent).

Nothing here is written per architecture. One traced forward pass finds the structure:
which norms read the residual stream (modules with a one-dimensional ``weight`` of the
hidden size), which linears read each norm's output, and which linears write the stream
(the block linears of output width hidden that read no norm). Each norm's scale rule is
measured (``x * w`` as in Llama, or ``x * (1 + w)`` as in Gemma) and its commutation with a
rotation checked. After folding, the rotated model's logits are compared with the
original's on random tokens; a model this cannot rotate exactly (LayerNorm with a mean,
norms on the residual branch as in Gemma-2/3, anything unforeseen) is refused with the
reason and left as it was.

A head tied to the embeddings is untied (the final norm's scale folds into the head, not the
lookup): one more table to store, which a size budget then prices like any tensor.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError, ModelError
from pvtune.llm.model import find_blocks
from pvtune.rotation.hadamard import rotation_matrix

log = logging.getLogger(__name__)

KINDS = ("hadamard", "orthogonal")


@dataclass(frozen=True)
class RotationConfig:
    """Which rotations to fold: ``residual`` (R1) and ``heads`` (R2), each a randomised
    Hadamard matrix where the size allows (``kind="hadamard"``) or a random orthogonal one
    (``kind="orthogonal"``), drawn from ``seed``. ``head_layers`` limits R2 to those decoder
    blocks (by index; None: every block)."""

    kind: str = "hadamard"
    residual: bool = True
    heads: bool = True
    seed: int = 0
    head_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"RotationConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.head_layers is not None:
            layers = tuple(self.head_layers)
            if not all(isinstance(i, int) and i >= 0 for i in layers):
                raise ConfigError(f"RotationConfig.head_layers must be block indices >= 0, "
                                  f"got {self.head_layers!r}")
            object.__setattr__(self, "head_layers", layers)
        if not (self.residual or self.heads):
            raise ConfigError("RotationConfig: enable residual (R1), heads (R2) or both")


@dataclass
class RotationReport:
    """What :func:`rotate_model_` folded: each rotation's matrix (``hadamard 36x16``,
    ``orthogonal``, or None when not applied), whether the head was untied, and the largest
    logit difference from the original model relative to the largest logit."""

    residual: str | None
    heads: str | None
    untied_head: bool
    relative_logit_error: float
    seed: int

    def to_dict(self) -> dict:
        """JSON-ready record (the checkpoint keeps it)."""
        return asdict(self)


@dataclass
class _Structure:
    hidden: int
    norms: dict[str, tuple[nn.Module, list[str]]]  # residual norm -> (module, reader linears)
    writers: list[str]
    attention: list[nn.Module]  # modules holding v_proj and o_proj


def _is_norm(module: nn.Module, hidden: int) -> bool:
    weight = getattr(module, "weight", None)
    return (not isinstance(module, nn.Linear | nn.Embedding) and not list(module.children())
            and isinstance(weight, nn.Parameter) and weight.dim() == 1
            and weight.numel() == hidden)


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _trace(model: nn.Module) -> _Structure:
    """The residual-stream structure of ``model`` from one forward pass (module docstring)."""
    structure = find_blocks(model)
    emb = model.get_input_embeddings()
    hidden = emb.weight.shape[1]
    names = {id(m): n for n, m in model.named_modules()}
    norms = {n: m for n, m in model.named_modules() if _is_norm(m, hidden)}
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    keep: list[Tensor] = []  # every traced tensor stays alive: storages cannot be reused
    norm_out: dict[int, str] = {}
    norm_in: dict[str, int] = {}
    lin_in: dict[str, int] = {}
    lin_out: dict[int, str] = {}

    def norm_hook(module, inputs, output):
        keep.extend([inputs[0], output])
        norm_in[names[id(module)]] = _storage(inputs[0])
        norm_out[_storage(output)] = names[id(module)]

    def linear_hook(module, inputs, output):
        keep.extend([inputs[0], output])
        lin_in[names[id(module)]] = _storage(inputs[0])
        lin_out[_storage(output)] = names[id(module)]

    handles = [m.register_forward_hook(norm_hook) for m in norms.values()]
    handles += [m.register_forward_hook(linear_hook) for m in linears.values()]
    ids = torch.arange(8).remainder(emb.weight.shape[0]).unsqueeze(0)
    try:
        with torch.no_grad():
            model(input_ids=ids.to(emb.weight.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    readers: dict[str, list[str]] = {n: [] for n in norms if n in norm_in}
    for lname, ptr in lin_in.items():
        if ptr in norm_out:
            readers[norm_out[ptr]].append(lname)
    prefix = structure.path + "."
    reading = {r for rs in readers.values() for r in rs}
    writers = [n for n, m in linears.items() if n.startswith(prefix) and n not in reading
               and m.out_features == hidden]
    writer_out = {ptr for ptr, n in lin_out.items() if n in writers}
    for n, ptr in norm_in.items():
        if ptr in writer_out:
            raise ModelError(
                f"cannot fold a rotation into {type(model).__name__}: the norm {n!r} reads a "
                f"linear layer's output before it joins the residual stream (norms on the "
                "residual branch, as in Gemma-2/3, do not commute with a rotation)")
    attention = [m for m in model.modules()
                 if isinstance(getattr(m, "v_proj", None), nn.Linear)
                 and isinstance(getattr(m, "o_proj", None), nn.Linear)
                 and not hasattr(m, "v_norm")]
    used = {n: (norms[n], rs) for n, rs in readers.items() if rs}
    return _Structure(hidden, used, writers, attention)


def fold_problem(model: nn.Module) -> str | None:
    """Why :func:`rotate_model_` would refuse ``model``'s structure (None: it would not)."""
    try:
        _trace(model)
    except ModelError as err:
        return str(err)
    return None


def _scale_rule(norm: nn.Module, hidden: int) -> tuple[Tensor, float]:
    """The norm's effective scale and the weight value that makes it 1 (1 for ``x * w``,
    0 for ``x * (1 + w)``); a :class:`ModelError` for a norm that is not an RMSNorm."""
    weight = norm.weight
    saved = weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, hidden, generator=gen, dtype=torch.float32).to(weight.device)
    with torch.no_grad():
        try:
            weight.zero_()
            at_zero = norm(x)
            unit = 0.0 if at_zero.abs().max() > 0 else 1.0
            gain = saved + 1.0 if unit == 0.0 else saved
            weight.fill_(unit)
            q = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen))[0].to(x.device)
            commutes = torch.allclose(norm(x @ q), norm(x) @ q, atol=1e-4, rtol=1e-4)
        finally:
            weight.copy_(saved)
    if not commutes:
        raise ModelError(f"cannot fold a rotation through a {type(norm).__name__}: it does not "
                         "commute with a rotation of its input (only RMSNorm-style norms do)")
    return gain.to(torch.float64), unit


def _set(param: Tensor, value: Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.to(torch.float64)


def rotate_model_(model: nn.Module, config: RotationConfig = RotationConfig()
                  ) -> RotationReport:
    """Fold the rotations of ``config`` into ``model`` in place (see the module docstring);
    the model computes the same logits (checked) and is an ordinary model of its class.
    A :class:`ModelError` says why a model cannot be rotated, leaving it unchanged."""
    structure = _trace(model)
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    vocab = emb.weight.shape[0]
    gen = torch.Generator().manual_seed(config.seed + 1)
    ids = torch.randint(0, vocab, (2, 16), generator=gen).to(emb.weight.device)
    before = _logits(model, ids)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tied = head is not None and head.weight is emb.weight
    untied = False
    gen = torch.Generator().manual_seed(config.seed)
    residual = heads = None
    try:
        if config.residual:
            if not isinstance(head, nn.Linear):
                raise ModelError("cannot fold a residual rotation without a linear output head")
            if head not in [model.get_submodule(r) for _, rs in structure.norms.values()
                            for r in rs]:
                raise ModelError("cannot fold a residual rotation: the output head does not "
                                 "read a norm's output")
            q, residual = rotation_matrix(structure.hidden, config.kind, gen)
            if tied:
                head.weight = nn.Parameter(emb.weight.detach().clone())
                model.config.tie_word_embeddings = False
                untied = True
            _fold_residual(model, structure, q)
        if config.heads and structure.attention:
            heads = _fold_heads(model, structure, config.kind, gen, config.head_layers)
        after = _logits(model, ids)
        error = float((after - before).abs().max() / before.abs().max().clamp(min=1e-30))
        if not error < 1e-3:
            raise ModelError(f"a rotation changed {type(model).__name__}'s logits by {error:.2e} "
                             "of their range: this architecture reads the residual stream in "
                             "a way pvtune does not fold")
    except ModelError:
        if untied:
            head.weight = emb.weight
            model.config.tie_word_embeddings = True
        model.load_state_dict(saved)
        raise
    report = RotationReport(residual, heads, untied, error, config.seed)
    log.info("rotations folded: residual %s, heads %s%s (logits within %.1e)", residual, heads,
             ", head untied" if untied else "", error)
    return report


def _fold_residual(model: nn.Module, structure: _Structure, q: Tensor) -> None:
    for norm, readers in structure.norms.values():
        gain, unit = _scale_rule(norm, structure.hidden)
        for name in readers:
            lin = model.get_submodule(name)
            _set(lin.weight, lin.weight.to(torch.float64) * gain)
        with torch.no_grad():
            norm.weight.fill_(unit)
    emb = model.get_input_embeddings()
    q = q.to(emb.weight.device)
    _set(emb.weight, emb.weight.to(torch.float64) @ q)
    for _, readers in structure.norms.values():
        for name in readers:
            lin = model.get_submodule(name)
            _set(lin.weight, lin.weight.to(torch.float64) @ q)
    for name in structure.writers:
        lin = model.get_submodule(name)
        _set(lin.weight, q.T @ lin.weight.to(torch.float64))
        if lin.bias is not None:
            _set(lin.bias, q.T @ lin.bias.to(torch.float64))


def _fold_heads(model: nn.Module, structure: _Structure, kind: str,
                gen: torch.Generator, layers: tuple[int, ...] | None) -> str | None:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or \
        config.hidden_size // config.num_attention_heads
    attention = [a for a in structure.attention
                 if a.v_proj.out_features % head_dim == 0 and a.o_proj.in_features % head_dim == 0]
    if layers is not None:
        blocks = find_blocks(model).blocks
        chosen = {id(m) for i in layers if i < len(blocks) for m in blocks[i].modules()}
        attention = [a for a in attention if id(a) in chosen]
    if not attention:
        return None
    h, what = rotation_matrix(head_dim, kind, gen)
    for attn in attention:
        v, o = attn.v_proj, attn.o_proj
        h = h.to(v.weight.device)
        wv = v.weight.to(torch.float64).reshape(-1, head_dim, v.in_features)
        _set(v.weight, torch.einsum("ji,kjl->kil", h, wv).reshape(v.weight.shape))
        if v.bias is not None:
            bv = v.bias.to(torch.float64).reshape(-1, head_dim)
            _set(v.bias, (bv @ h).reshape(-1))
        wo = o.weight.to(torch.float64).reshape(o.out_features, -1, head_dim)
        _set(o.weight, (wo @ h).reshape(o.weight.shape))
    return what
