"""Weight representations: each decodes integer codes and continuous parameters to a dense
weight. See :mod:`pvtune.reprs.base` for the contract."""

from pvtune.reprs.base import (
    CONFIG_TYPES,
    REPRESENTATIONS,
    QuantizedWeight,
    ReprConfig,
    register_representation,
    representation_for,
)
from pvtune.reprs.binary import BinaryConfig, BinaryWeight, TernaryConfig, TernaryWeight
from pvtune.reprs.codebook import AdditiveWeight, AQLMConfig, VQConfig, VQWeight
from pvtune.reprs.gguf_block import BLOCK_FORMATS, GGUFBlockConfig, GGUFBlockWeight
from pvtune.reprs.grouped_codebook import GroupedCodebookConfig, GroupedCodebookWeight
from pvtune.reprs.sparse import NMSparseConfig, NMSparseWeight
from pvtune.reprs.uniform import UniformConfig, UniformWeight

__all__ = [
    "CONFIG_TYPES",
    "REPRESENTATIONS",
    "AQLMConfig",
    "BLOCK_FORMATS",
    "GGUFBlockConfig",
    "GGUFBlockWeight",
    "GroupedCodebookConfig",
    "GroupedCodebookWeight",
    "AdditiveWeight",
    "BinaryConfig",
    "BinaryWeight",
    "NMSparseConfig",
    "NMSparseWeight",
    "QuantizedWeight",
    "ReprConfig",
    "TernaryConfig",
    "TernaryWeight",
    "UniformConfig",
    "UniformWeight",
    "VQConfig",
    "VQWeight",
    "register_representation",
    "representation_for",
]
