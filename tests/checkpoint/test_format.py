"""Bit-exact save/load of quantized models and clear errors for broken checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pvtune import (
    AQLMConfig,
    BinaryConfig,
    CheckpointError,
    NMSparseConfig,
    TernaryConfig,
    UniformConfig,
    VQConfig,
    load_quantized,
    quantize_,
    save_quantized,
)
from pvtune.checkpoint.format import LAYOUT_FILE, WEIGHTS_FILE

CONFIGS = [
    UniformConfig(bits=3, group_size=16),
    UniformConfig(bits=4, group_size=None, symmetric=True),
    BinaryConfig(group_size=8),
    TernaryConfig(),
    NMSparseConfig(n=2, m=4),
    VQConfig(num_codewords=16, group_size=4, kmeans_iters=3),
    AQLMConfig(num_codebooks=2, nbits_per_codebook=4, in_group_size=4, kmeans_iters=3),
]


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 32)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)))


def build(seed=0):
    torch.manual_seed(seed)
    return Tied()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.type_name)
def test_round_trip_bit_exact(config, tmp_path):
    model = build()
    quantize_(model, config, filter_fn=lambda m, n: n.startswith("body"))
    with torch.no_grad():  # move continuous params off the fp16 grid, as training would
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    ids = torch.arange(10)
    ref = model(ids)
    save_quantized(model, tmp_path)
    fresh = build(seed=1)
    load_quantized(fresh, tmp_path)
    assert torch.equal(fresh(ids), ref)
    assert fresh.head.weight is fresh.embed.weight
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), fresh.state_dict().items(),
                                  strict=True):
        assert ka == kb and va.dtype == vb.dtype and torch.equal(va, vb)


def test_codes_are_packed_on_disk(tmp_path):
    model = nn.Sequential(nn.Linear(256, 256, bias=False))
    quantize_(model, UniformConfig(bits=2, group_size=64))
    save_quantized(model, tmp_path)
    size = (tmp_path / WEIGHTS_FILE).stat().st_size
    payload = 256 * 256 * 2 / 8 + 256 * 4 * (2 + 16) / 8  # codes + fp16 scales + zeros
    assert payload <= size < payload + 2000
    assert model[0].bits_per_param() == pytest.approx(8 * payload / 256**2)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a pvtune checkpoint"):
        load_quantized(build(), tmp_path / "nope")


def test_truncated_weights(tmp_path):
    model = build()
    quantize_(model, UniformConfig(bits=3, group_size=16), lambda m, n: n.startswith("body"))
    save_quantized(model, tmp_path)
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_quantized(build(), tmp_path)


def test_corrupted_layout(tmp_path):
    model = build()
    quantize_(model, BinaryConfig(), lambda m, n: n.startswith("body"))
    save_quantized(model, tmp_path)
    (tmp_path / LAYOUT_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(build(), tmp_path)


def test_wrong_model(tmp_path):
    model = build()
    quantize_(model, BinaryConfig(), lambda m, n: n.startswith("body"))
    save_quantized(model, tmp_path)
    with pytest.raises(CheckpointError, match="does not fit the model|does not match"):
        load_quantized(nn.Sequential(nn.Linear(3, 3)), tmp_path)


def test_unknown_format_version(tmp_path):
    model = build()
    quantize_(model, BinaryConfig(), lambda m, n: n.startswith("body"))
    save_quantized(model, tmp_path)
    layout = json.loads((tmp_path / LAYOUT_FILE).read_text())
    layout["version"] = 99
    (tmp_path / LAYOUT_FILE).write_text(json.dumps(layout))
    with pytest.raises(CheckpointError, match="unsupported format"):
        load_quantized(build(), tmp_path)
