"""``QuantizedEmbedding``: a token-embedding table held in a :class:`QuantizedWeight`, and
:func:`compress_embeddings_`, which swaps a model's table (and a tied head) for one.

The embedding is a :class:`QuantizedLinear` whose forward looks rows up instead of
multiplying, so checkpoints, bit counts and exports handle it like any compressed matrix
(``out_features`` = vocabulary size, ``in_features`` = embedding width). A head tied to
the embeddings becomes a :class:`QuantizedLinear` over the *same* representation: one set of
codes, stored once, and the tie survives save and load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.nn.quantize import _set_submodule
from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.reprs.base import ReprConfig, representation_for


class QuantizedEmbedding(QuantizedLinear):
    """``embedding[ids]`` with the ``[vocab, dim]`` table decoded from ``qweight``."""

    def __init__(self, qweight, padding_idx: int | None = None) -> None:
        super().__init__(qweight, None)
        self.padding_idx = padding_idx

    @property
    def num_embeddings(self) -> int:
        """Vocabulary size (rows of the table)."""
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        """Width of each embedding."""
        return self.in_features

    def forward(self, ids: Tensor) -> Tensor:  # type: ignore[override]
        return F.embedding(ids, self._dense_weight(), self.padding_idx)

    def to_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the decoded table."""
        w = self.qweight().detach()
        emb = nn.Embedding(self.out_features, self.in_features, padding_idx=self.padding_idx)
        emb.weight.data = w.clone()
        return emb

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}"


@dataclass(frozen=True)
class EmbeddingCompression:
    """How :func:`compress_embeddings_` stores the token embeddings (``embeddings``) and an
    untied output head (``head``; None keeps it dense). A tied head always shares the
    embeddings' representation."""

    embeddings: ReprConfig
    head: ReprConfig | None = None


def compress_embeddings_(model: nn.Module, config: EmbeddingCompression) -> dict[str, str]:
    """Compress ``model``'s input embeddings (round to nearest in the configured
    representation) and, when tied, its head with them; returns ``{module name: what}``.

    The model must expose ``get_input_embeddings`` / ``get_output_embeddings`` (every
    transformers causal LM does)."""
    emb = model.get_input_embeddings()
    if isinstance(emb, QuantizedEmbedding):
        raise ConfigError("the embeddings are compressed already")
    if not isinstance(emb, nn.Embedding):
        raise ConfigError(f"cannot compress embeddings of type {type(emb).__name__}")
    head = model.get_output_embeddings()
    tied = isinstance(head, nn.Linear) and head.weight is emb.weight
    try:
        config.embeddings.check_shape(emb.num_embeddings, emb.embedding_dim)
        rep = representation_for(config.embeddings).from_dense(emb.weight, config.embeddings)
    except ValueError as err:
        raise ConfigError(f"cannot compress the embeddings ({emb.num_embeddings}x"
                          f"{emb.embedding_dim}): {err}") from None
    names = {id(m): n for n, m in model.named_modules()}
    done = {}
    _set_submodule(model, names[id(emb)], QuantizedEmbedding(rep, emb.padding_idx))
    done[names[id(emb)]] = config.embeddings.type_name
    if tied:
        _set_submodule(model, names[id(head)], QuantizedLinear(rep, head.bias))
        done[names[id(head)]] = "tied to the embeddings"
    elif head is not None and config.head is not None and isinstance(head, nn.Linear):
        _set_submodule(model, names[id(head)], QuantizedLinear.from_linear(head, config.head))
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
