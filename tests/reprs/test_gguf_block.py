"""GGUF block types: decode equals ggml's definition bit for bit, bytes round-trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pvtune.errors import ConfigError
from pvtune.reprs import BLOCK_FORMATS, GGUFBlockConfig, GGUFBlockWeight
from pvtune.reprs.gguf_block import pack_blocks, unpack_blocks

NAMES = sorted(BLOCK_FORMATS)


def reference_dequantize(data: np.ndarray, name: str, inp: int) -> np.ndarray:
    """ggml's ``dequantize_row_*`` (ggml-quants.c), written out loop by loop from the block
    definitions in ggml-common.h; independent of pvtune's vectorised unpacking."""
    rows = data.reshape(data.shape[0], -1)
    out = np.zeros((rows.shape[0], inp), dtype=np.float32)
    fmt = BLOCK_FORMATS[name]
    for r in range(rows.shape[0]):
        for b in range(inp // fmt.block_size):
            blk = rows[r, b * fmt.type_size:(b + 1) * fmt.type_size]
            d = float(blk[0:2].view(np.float16)[0])
            base = b * fmt.block_size
            if name == "tq2_0":  # block_tq2_0 { qs[64]; d }: dequantize_row_tq2_0
                d = float(blk[64:66].view(np.float16)[0])
                k = 0
                for j in range(0, 64, 32):
                    for ll in range(4):
                        for m in range(32):
                            q = (int(blk[j + m]) >> (ll * 2)) & 3
                            out[r, base + k] = (q - 1) * d
                            k += 1
            elif name == "q8_0":
                qs = blk[2:].view(np.int8)
                for j in range(32):
                    out[r, base + j] = int(qs[j]) * d
            elif name in ("q4_0", "q4_1"):
                m = float(blk[2:4].view(np.float16)[0]) if name == "q4_1" else 0.0
                qs = blk[4:] if name == "q4_1" else blk[2:]
                off = 0 if name == "q4_1" else 8
                for j in range(16):
                    out[r, base + j] = ((int(qs[j]) & 0x0F) - off) * d + m
                    out[r, base + j + 16] = ((int(qs[j]) >> 4) - off) * d + m
            elif name == "q2_0":
                qs = blk[2:]
                for j in range(64):
                    q = (int(qs[j // 4]) >> ((j % 4) * 2)) & 3
                    out[r, base + j] = (q - 1) * d
            elif name == "q1_0":
                qs = blk[2:]
                for j in range(128):
                    bit = (int(qs[j // 8]) >> (j % 8)) & 1
                    out[r, base + j] = d if bit else -d
    return out


@pytest.fixture
def weight():
    return torch.randn(6, 256, generator=torch.Generator().manual_seed(0)) * 0.02


@pytest.mark.parametrize("name", NAMES)
def test_decode_equals_ggml_definition_bit_for_bit(name, weight):
    rep = GGUFBlockWeight.from_dense(weight, GGUFBlockConfig(name))
    blocks = rep.to_gguf_blocks()
    assert blocks.shape == (6, 256 // rep.format.block_size * rep.format.type_size)
    ref = reference_dequantize(blocks, name, 256)
    np.testing.assert_array_equal(rep().detach().numpy(), ref)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0", "tq2_0"])
def test_decode_equals_the_gguf_package(name, weight):
    import gguf

    rep = GGUFBlockWeight.from_dense(weight, GGUFBlockConfig(name))
    qtype = gguf.GGMLQuantizationType[name.upper()]
    ref = gguf.quants.dequantize(rep.to_gguf_blocks(), qtype)
    np.testing.assert_array_equal(rep().detach().numpy(), ref)


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0", "tq2_0"])
def test_llama_cpp_reference_quantizer_bytes_import_and_export_unchanged(name, weight):
    """Blocks made by ggml's reference quantizer (the gguf package's port; negative ``d``
    for Q4_0) read into pvtune and write back byte for byte."""
    import gguf

    qtype = gguf.GGMLQuantizationType[name.upper()]
    data = gguf.quants.quantize(weight.numpy(), qtype)
    rep = GGUFBlockWeight.from_gguf_blocks(data, 6, 256, GGUFBlockConfig(name))
    np.testing.assert_array_equal(rep.to_gguf_blocks(), data)
    np.testing.assert_array_equal(rep().detach().numpy(), gguf.quants.dequantize(data, qtype))


@pytest.mark.parametrize("name", NAMES)
def test_random_bytes_round_trip(name):
    """Any block content, including negative and subnormal scales, survives unpack+pack."""
    fmt = BLOCK_FORMATS[name]
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=(3, 4 * fmt.type_size), dtype=np.uint8)
    for k in range(0, data.shape[1], fmt.type_size):  # finite fp16 scales
        at = k + fmt.type_size - 2 if fmt.interleaved else k  # TQ2_0 stores d last
        data[:, at:at + 2] = np.float16(rng.standard_normal(3) * 1e-3).reshape(3, 1).view(
            np.uint8)
        if fmt.has_min:
            data[:, k + 2:k + 4] = np.float16(rng.standard_normal(3)).reshape(3, 1).view(np.uint8)
    codes, d, m = unpack_blocks(data, 3, 4 * fmt.block_size, fmt)
    np.testing.assert_array_equal(pack_blocks(codes, d, m, fmt), data)


@pytest.mark.parametrize("name", NAMES)
def test_bits_are_the_gguf_type_size(name):
    import gguf

    fmt = BLOCK_FORMATS[name]
    assert fmt.bits_per_weight == {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q2_0": 2.25,
                                   "q1_0": 1.125, "tq2_0": 2.0625}[name]
    if name != "q2_0":  # the gguf package predates Q2_0
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(fmt.ggml_type)]
        assert (block, size) == (fmt.block_size, fmt.type_size)


def test_q2_0_fit_beats_llama_cpp_reference_scale(weight):
    """llama.cpp's Q2_0 quantizer sets ``d = max|w|`` (levels -d..2d); pvtune searches the
    sign and size of ``d``, which on Gaussian weights must cut the error at least 3x."""
    rep = GGUFBlockWeight.from_dense(weight, GGUFBlockConfig("q2_0"))
    ours = float((rep().detach() - weight).pow(2).sum())
    g = weight.reshape(6, -1, 64)
    d = g.abs().amax(-1, keepdim=True).half().float()
    ref = (torch.clamp(torch.round(g / d) + 1, 0, 3) - 1) * d
    assert ours * 3 < float((ref - g).pow(2).sum())


def test_config_errors_name_the_fix():
    with pytest.raises(ConfigError, match="known"):
        GGUFBlockConfig("q3_0")
    with pytest.raises(ConfigError, match="multiple of 64"):
        GGUFBlockWeight(4, 96, GGUFBlockConfig("q2_0"))
    assert GGUFBlockConfig("Q4_0").block_type == "q4_0"


def test_tq2_0_is_ternary_and_fits_better_than_the_reference_quantizer(weight):
    """TQ2_0 codes stay in {0, 1, 2} (ternary); pvtune's fit of ``d`` beats the reference
    quantizer's ``d = max|w|`` on Gaussian weights by more than 3x in squared error."""
    import gguf

    rep = GGUFBlockWeight.from_dense(weight, GGUFBlockConfig("tq2_0"))
    assert int(rep.codes.max()) <= 2
    ours = float((rep().detach() - weight).pow(2).sum())
    data = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.TQ2_0)
    theirs = float(((torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType
                                                             .TQ2_0)) - weight) ** 2).sum())
    assert ours * 3 < theirs


def test_tq2_0_needs_rows_of_256():
    with pytest.raises(ConfigError, match="multiple of 256"):
        GGUFBlockWeight.from_dense(torch.randn(4, 128), GGUFBlockConfig("tq2_0"))
