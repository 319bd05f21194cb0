"""Exact bits/param against each formula; SQNR lower bounds per bit width."""

from __future__ import annotations

import math

import pytest

from pvtune.reprs import (
    AQLMConfig,
    BinaryConfig,
    GGUFBlockConfig,
    NMSparseConfig,
    TernaryConfig,
    UniformConfig,
    VQConfig,
    representation_for,
)
from tests.conftest import sqnr_db


def make(config, weight):
    return representation_for(config).from_dense(weight, config)


@pytest.mark.parametrize(("config", "expected"), [
    (UniformConfig(bits=4, group_size=64), 4 + 20 / 64),       # 4.3125, METHODS' 4.31
    (UniformConfig(bits=3, group_size=64), 3 + 19 / 64),       # 3.30
    (UniformConfig(bits=2, group_size=64), 2 + 18 / 64),       # 2.28
    (UniformConfig(bits=2, group_size=64, symmetric=True), 2 + 16 / 64),
    (UniformConfig(bits=3, group_size=None), 3 + 19 / 512),
    (BinaryConfig(), 1 + 16 / 512),
    (BinaryConfig(group_size=128), 1 + 16 / 128),
    (TernaryConfig(), 1.6 + 16 / 512),
    (NMSparseConfig(n=2, m=4), (2 * 16 + math.ceil(math.log2(6))) / 4),
    (NMSparseConfig(n=1, m=4), (16 + 2) / 4),
    (NMSparseConfig(n=3, m=8), (3 * 16 + 6) / 8),  # C(8, 3) = 56 patterns: 6 bits
    (VQConfig(num_codewords=256, group_size=8, kmeans_iters=2),
     (128 * 512 / 8 * 8 + 256 * 8 * 16) / (128 * 512)),
    (VQConfig(num_codewords=100, group_size=4, kmeans_iters=2),
     (128 * 512 / 4 * 7 + 100 * 4 * 16) / (128 * 512)),
    (AQLMConfig.preset("2x8g8", kmeans_iters=2),
     (128 * 512 / 8 * 2 * 8 + 2 * 256 * 8 * 16 + 128 * 16) / (128 * 512)),
    (AQLMConfig.preset("1x8g8", kmeans_iters=2),
     (128 * 512 / 8 * 1 * 8 + 1 * 256 * 8 * 16 + 128 * 16) / (128 * 512)),
    (GGUFBlockConfig("q8_0"), 8.5),
    (GGUFBlockConfig("q4_0"), 4.5),
    (GGUFBlockConfig("q4_1"), 5.0),
    (GGUFBlockConfig("q2_0"), 2.25),
    (GGUFBlockConfig("q1_0"), 1.125),
    (GGUFBlockConfig("tq2_0"), 2.0625),
])
def test_bits_per_param_formula_is_what_is_stored(config, expected, gaussian_weight, tmp_path):
    """The formula of the paper or format, and the bytes a save actually writes for the
    representation (codes packed, continuous parameters in float16), agree up to the byte
    padding of each packed code stream."""
    from torch import nn

    from pvtune import QuantizedLinear, save_quantized

    rep = make(config, gaussian_weight)
    assert rep.bits_per_param() == pytest.approx(expected, rel=1e-12)
    model = nn.Sequential(QuantizedLinear(rep))
    bits = save_quantized(model, tmp_path)["meta"]["bits"]
    padding = 8 * len(rep.integer_codecs()) / gaussian_weight.numel()
    assert bits["linear_bits_per_param"] == pytest.approx(expected, abs=padding)
    assert bits["linear_bits_per_param"] >= expected - 1e-12


def test_aqlm_2x8g8_is_about_two_bits_on_a_large_layer():
    rep = representation_for(AQLMConfig.preset("2x8g8"))(4096, 4096, AQLMConfig.preset("2x8g8"))
    assert rep.bits_per_param() == pytest.approx(2 + (2 * 256 * 8 * 16 + 4096 * 16) / 4096**2)


# (config, min SQNR dB on Gaussian, min SQNR dB on Student-t(3)) for a 128x512 weight;
# measured values are 0.2-0.6 dB above these bounds.
SQNR_BOUNDS = [
    (UniformConfig(bits=8, group_size=64), 45.0, 41.7),
    (UniformConfig(bits=4, group_size=64), 20.5, 17.2),
    (UniformConfig(bits=4, group_size=64, scale_search=True), 20.9, 17.5),
    (UniformConfig(bits=4, group_size=64, symmetric=True), 19.5, 15.0),
    (UniformConfig(bits=3, group_size=64), 13.9, 11.0),
    (UniformConfig(bits=3, group_size=64, scale_search=True), 14.8, 11.9),
    (UniformConfig(bits=2, group_size=64), 6.5, 5.4),
    (UniformConfig(bits=2, group_size=64, scale_search=True), 8.7, 7.0),
    (UniformConfig(bits=2, group_size=64, symmetric=True), 3.3, 3.6),
    (UniformConfig(bits=2, group_size=64, symmetric=True, scale_search=True), 7.7, 5.8),
    (UniformConfig(bits=1, group_size=64, scale_search=True), 1.5, 2.4),
    (BinaryConfig(), 4.2, 2.1),
    (TernaryConfig(), 5.5, 2.7),
    (NMSparseConfig(n=2, m=4), 8.4, 11.4),
    (VQConfig(num_codewords=64, group_size=4), 7.0, 7.1),
    (AQLMConfig.preset("2x8g8"), 10.5, 11.0),
    (AQLMConfig.preset("1x8g8"), 5.0, 5.8),
    (GGUFBlockConfig("q8_0"), 45.2, 41.4),
    (GGUFBlockConfig("q4_0"), 21.3, 17.6),
    (GGUFBlockConfig("q4_1"), 22.1, 20.0),
    (GGUFBlockConfig("q2_0"), 8.8, 6.9),
    (GGUFBlockConfig("q1_0"), 4.1, 2.1),
    (GGUFBlockConfig("tq2_0"), 7.1, 4.1),
]


@pytest.mark.parametrize(("config", "gauss_db", "heavy_db"), SQNR_BOUNDS,
                         ids=[str(i) for i in range(len(SQNR_BOUNDS))])
def test_sqnr_lower_bounds(config, gauss_db, heavy_db, gaussian_weight, heavy_tailed_weight):
    assert sqnr_db(gaussian_weight, make(config, gaussian_weight)()) >= gauss_db
    assert sqnr_db(heavy_tailed_weight, make(config, heavy_tailed_weight)()) >= heavy_db


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7])
def test_uniform_sqnr_grows_about_6db_per_bit(bits, gaussian_weight):
    cfg = lambda b: UniformConfig(bits=b, group_size=64)  # noqa: E731
    lo = sqnr_db(gaussian_weight, make(cfg(bits), gaussian_weight)())
    hi = sqnr_db(gaussian_weight, make(cfg(bits + 1), gaussian_weight)())
    assert 5.5 < hi - lo < 7.0


def test_scale_search_not_worse_than_minmax(heavy_tailed_weight):
    plain = make(UniformConfig(bits=3, scale_search=False), heavy_tailed_weight)
    searched = make(UniformConfig(bits=3, scale_search=True), heavy_tailed_weight)
    assert searched.group_errors(heavy_tailed_weight).sum() <= \
        plain.group_errors(heavy_tailed_weight).sum()
