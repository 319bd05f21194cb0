"""``QuantizedEmbedding``: a token-embedding table held in a :class:`QuantizedWeight`, and
:func:`compress_embeddings_`, which swaps a model's table (and a tied head) for one.

The embedding is a :class:`QuantizedLinear` whose forward looks rows up instead of
multiplying, so checkpoints, bit counts and exports handle it like any compressed matrix
(``out_features`` = vocabulary size, ``in_features`` = embedding width). A head tied to
the embeddings becomes a :class:`QuantizedLinear` over the *same* representation: one set of
codes, stored once, and the tie survives save and load.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import Tensor, nn
from torch.func import functional_call

from pvtune.errors import CheckpointError, ConfigError
from pvtune.nn.quantized_linear import QuantizedLinear, register_layer_kind
from pvtune.nn.replace import set_submodule
from pvtune.reprs.base import ReprConfig, representation_for


@register_layer_kind("embedding")
class QuantizedEmbedding(QuantizedLinear):
    """``embedding[ids]`` with the ``[vocab, dim]`` table decoded from ``qweight``.

    The lookup is the original embedding module's own forward with the decoded table in place
    of its weight (``lookup``, a copy of that module without its table), so whatever the
    module does besides indexing survives compression: a padding index, the scaling of
    Gemma's embeddings by sqrt(hidden size), parameters or buffers a subclass adds.
    """

    def __init__(self, qweight, padding_idx: int | None = None, *,
                 original: nn.Embedding | None = None) -> None:
        super().__init__(qweight, None)
        if original is None:
            original = nn.Embedding(qweight.out_features, qweight.in_features,
                                    padding_idx=padding_idx, device="meta")
        self.lookup = lookup_template(original)

    @classmethod
    def of(cls, qweight, original: nn.Embedding) -> QuantizedEmbedding:
        """A compressed stand-in for ``original`` (an ``nn.Embedding`` or a subclass, or a
        :class:`QuantizedEmbedding` whose lookup it reuses) holding ``qweight``."""
        if isinstance(original, QuantizedEmbedding):
            return cls(qweight, original=original.lookup)
        return cls(qweight, original=original)

    @property
    def padding_idx(self) -> int | None:
        """The padding index of the original module (None without one)."""
        return self.lookup.padding_idx

    @property
    def num_embeddings(self) -> int:
        """Vocabulary size (rows of the table)."""
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        """Width of each embedding."""
        return self.in_features

    def forward(self, ids: Tensor) -> Tensor:  # type: ignore[override]
        return functional_call(self.lookup, {"weight": self._dense_weight()}, (ids,))

    def to_embedding(self) -> nn.Embedding:
        """A module of the original class holding the decoded table."""
        w = self.qweight().detach()
        emb = _copy_module(self.lookup)
        emb.weight = nn.Parameter(w.clone())
        return emb

    @classmethod
    def from_layout(cls, current, name, spec, source, done) -> QuantizedEmbedding:
        """An empty compressed table for the checkpoint entry ``spec`` in place of the
        model's embedding ``current`` (whose lookup it keeps)."""
        if not isinstance(current, nn.Embedding | QuantizedEmbedding):
            raise CheckpointError(f"{source}: layer {name!r} is a {type(current).__name__} in "
                                  "the model, not an embedding table")
        shape = (spec["out_features"], spec["in_features"])
        have = (current.num_embeddings, current.embedding_dim)
        if have != shape:
            raise CheckpointError(f"{source}: embedding {name!r} is {have[0]}x{have[1]} in the "
                                  f"model but {shape[0]}x{shape[1]} in the checkpoint")
        try:
            config = ReprConfig.from_dict(spec["config"])
            rep = representation_for(config)(*shape, config)
        except ValueError as err:
            raise CheckpointError(f"{source}: layer {name!r}: {err}") from None
        return cls.of(rep, current)

    def to_dense_module(self) -> nn.Module:
        """The embedding module this layer replaces (see :meth:`to_embedding`)."""
        return self.to_embedding()

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, lookup={type(self.lookup).__name__}"


def _copy_module(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` with its own parameter, buffer and submodule tables."""
    copy_ = copy.copy(module)
    copy_._parameters = dict(module._parameters)
    copy_._buffers = dict(module._buffers)
    copy_._modules = dict(module._modules)
    copy_._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    return copy_


def lookup_template(original: nn.Module) -> nn.Embedding:
    """``original`` (an ``nn.Embedding`` or a subclass) without its table, ready to run
    with a table passed in by ``functional_call``; a :class:`ConfigError` for options a
    decoded table cannot honour."""
    if not isinstance(original, nn.Embedding):
        raise ConfigError(f"cannot compress embeddings of type {type(original).__name__}: "
                          "pvtune compresses nn.Embedding tables and their subclasses")
    if original.max_norm is not None:
        raise ConfigError("cannot compress an embedding with max_norm (it rewrites its table "
                          "in place on every lookup)")
    if original.sparse:
        raise ConfigError("cannot compress an embedding with sparse gradients")
    template = _copy_module(original)
    template._parameters.pop("weight", None)
    return template


@dataclass(frozen=True)
class EmbeddingCompression:
    """How :func:`compress_embeddings_` stores the token embeddings (``embeddings``) and an
    untied output head (``head``); None keeps either dense. A tied head always shares the
    embeddings' representation."""

    embeddings: ReprConfig | None
    head: ReprConfig | None = None


def compress_embeddings_(model: nn.Module, config: EmbeddingCompression) -> dict[str, str]:
    """Compress ``model``'s input embeddings (round to nearest in the configured
    representation) and, when tied, its head with them; returns ``{module name: what}``.

    The model must expose ``get_input_embeddings`` / ``get_output_embeddings`` (every
    transformers causal LM does)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    tied = isinstance(head, nn.Linear) and head.weight is getattr(emb, "weight", None)
    done = {}
    if config.embeddings is not None:
        if isinstance(emb, QuantizedEmbedding):
            raise ConfigError("the embeddings are compressed already")
        lookup_template(emb)  # refuses what a decoded table cannot stand in for
        try:
            config.embeddings.check_shape(emb.num_embeddings, emb.embedding_dim)
            rep = representation_for(config.embeddings).from_dense(emb.weight, config.embeddings)
        except ValueError as err:
            raise ConfigError(f"cannot compress the embeddings ({emb.num_embeddings}x"
                              f"{emb.embedding_dim}): {err}") from None
        set_submodule(model, names[id(emb)], QuantizedEmbedding.of(rep, emb))
        done[names[id(emb)]] = config.embeddings.type_name
    if tied and config.embeddings is not None:
        set_submodule(model, names[id(head)], QuantizedLinear(rep, head.bias))
        done[names[id(head)]] = "tied to the embeddings"
    elif head is not None and config.head is not None and isinstance(head, nn.Linear):
        set_submodule(model, names[id(head)], QuantizedLinear.from_linear(head, config.head))
        done[names[id(head)]] = config.head.type_name
    return done


def shared_layers(layers: dict[str, QuantizedLinear]) -> dict[str, str]:
    """``{name: first name}`` of layers whose representation is another's (a tied head)."""
    first: dict[int, str] = {}
    out = {}
    for name, layer in layers.items():
        key = id(layer.qweight)
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out
