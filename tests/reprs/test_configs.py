"""Bad configs raise ValueError naming the field and its allowed range."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pvtune.reprs import (
    AQLMConfig,
    BinaryConfig,
    NMSparseConfig,
    ReprConfig,
    TernaryConfig,
    UniformConfig,
    VQConfig,
    representation_for,
)


@pytest.mark.parametrize(("factory", "message"), [
    (lambda: UniformConfig(bits=0), r"UniformConfig\.bits must be in \[1, 8\], got 0"),
    (lambda: UniformConfig(bits=9), r"UniformConfig\.bits must be in \[1, 8\], got 9"),
    (lambda: UniformConfig(bits=1, symmetric=True), r"UniformConfig\.bits must be in \[2, 8\]"),
    (lambda: UniformConfig(group_size=0), r"UniformConfig\.group_size must be >= 1, got 0"),
    (lambda: UniformConfig(bits=2.5), r"UniformConfig\.bits must be an int"),
    (lambda: NMSparseConfig(n=4, m=4), r"NMSparseConfig\.n must be in \[1, 3\], got 4"),
    (lambda: NMSparseConfig(n=5, m=4), r"NMSparseConfig\.n must be in \[1, 3\], got 5"),
    (lambda: NMSparseConfig(n=0, m=4), r"NMSparseConfig\.n must be in \[1, 3\], got 0"),
    (lambda: BinaryConfig(group_size=-1), r"BinaryConfig\.group_size must be >= 1"),
    (lambda: VQConfig(num_codewords=1), r"VQConfig\.num_codewords must be in \[2, 65536\]"),
    (lambda: AQLMConfig(nbits_per_codebook=0),
     r"AQLMConfig\.nbits_per_codebook must be in \[1, 16\], got 0"),
    (lambda: AQLMConfig(num_codebooks=0), r"AQLMConfig\.num_codebooks must be in \[1, 16\]"),
    (lambda: AQLMConfig.preset("2x8"), r"not of the form MxBgG"),
])
def test_bad_field_values(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@pytest.mark.parametrize(("config", "message"), [
    (UniformConfig(bits=4, group_size=48), r"UniformConfig\.group_size=48 does not divide "
                                           r"in_features=64"),
    (BinaryConfig(group_size=24), r"BinaryConfig\.group_size=24 does not divide"),
    (TernaryConfig(group_size=24), r"TernaryConfig\.group_size=24 does not divide"),
    (NMSparseConfig(n=2, m=3), r"NMSparseConfig\.m=3 does not divide"),
    (VQConfig(num_codewords=256, group_size=8), r"VQConfig\.num_codewords: 256 codewords "
                                                r"exceed the 64 weight groups.*\[2, 64\]"),
    (AQLMConfig.preset("1x16g8"), r"AQLMConfig\.nbits_per_codebook: 65536 codewords exceed"),
    (AQLMConfig.preset("2x8g6"), r"AQLMConfig\.in_group_size=6 does not divide"),
])
def test_shape_incompatible_configs(config, message):
    with pytest.raises(ValueError, match=message):
        representation_for(config).from_dense(torch.randn(8, 64), config)


@pytest.mark.parametrize("config", [
    UniformConfig(bits=3, group_size=None, symmetric=True), BinaryConfig(group_size=8),
    TernaryConfig(), NMSparseConfig(n=1, m=2), VQConfig(num_codewords=32),
    AQLMConfig.preset("2x8g8", beam_size=2),
])
def test_config_json_round_trip(config):
    import json

    data = json.loads(json.dumps(config.to_dict()))
    assert ReprConfig.from_dict(data) == config


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        UniformConfig().bits = 3


def test_from_dict_errors():
    with pytest.raises(ValueError, match="no 'type' key"):
        ReprConfig.from_dict({"bits": 3})
    with pytest.raises(KeyError, match="unknown representation config type 'nope'"):
        ReprConfig.from_dict({"type": "nope"})
