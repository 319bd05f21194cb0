"""Bit-exact save/load of quantized models, bits from the bytes stored, and clear errors for
broken, edited or mismatched checkpoints."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from torch import nn

from pvtune import (
    AQLMConfig,
    BinaryConfig,
    CheckpointError,
    GGUFBlockConfig,
    NMSparseConfig,
    TernaryConfig,
    UniformConfig,
    VQConfig,
    load_quantized,
    quantize_,
    save_quantized,
)
from pvtune.checkpoint.files import write_json_atomic
from pvtune.checkpoint.format import (
    LAYOUT_FILE,
    LEGACY_WEIGHTS_FILE,
    _layout_checksum,
    pack_state,
    read_layout,
    weights_path,
)

CONFIGS = [
    UniformConfig(bits=3, group_size=16),
    UniformConfig(bits=4, group_size=None, symmetric=True),
    BinaryConfig(group_size=8),
    TernaryConfig(),
    GGUFBlockConfig("q4_1"),
    GGUFBlockConfig("q8_0"),
    NMSparseConfig(n=2, m=4),
    NMSparseConfig(n=3, m=8),
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


def quantized(config=None, seed=0):
    model = build(seed)
    quantize_(model, config or UniformConfig(bits=3, group_size=16),
              filter_fn=lambda m, n: n.startswith("body"))
    return model


def payload_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file: its size minus the 8-byte length and the
    JSON header."""
    raw = path.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    return len(raw) - 8 - header


def rewrite_layout(directory, edit) -> None:
    """Edit a saved layout and re-sign it, as a consistent hand edit (or a bug) would."""
    path = directory / LAYOUT_FILE
    layout = json.loads(path.read_text())
    edit(layout)
    layout["checksum"] = _layout_checksum(layout)
    write_json_atomic(path, layout)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.type_name)
def test_round_trip_bit_exact(config, tmp_path):
    model = quantized(config)
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


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.type_name)
def test_reported_bits_are_the_bytes_on_disk(config, tmp_path):
    """Whole-model bits equal the file's tensor bytes exactly; the linears' bits equal the
    representation's formula (up to the byte padding of each packed code stream)."""
    model = quantized(config)
    meta = save_quantized(model, tmp_path)["meta"]
    bits = meta["bits"]
    payload = payload_bytes(weights_path(tmp_path, read_layout(tmp_path)))
    assert bits["stored_bytes"] == payload
    params = 10 * 32 + (32 * 64 + 64) + (64 * 32 + 32)  # tied embedding once, biases
    assert bits["params_total"] == params
    assert bits["overall_bits_per_param"] == 8 * payload / params
    for name in ("body.0", "body.2"):
        layer = model.get_submodule(name)
        weights = layer.in_features * layer.out_features
        stored = bits["layers"][name]["bits_per_param"]
        assert stored == pytest.approx(layer.bits_per_param(), abs=8 * 4 / weights)
    # a representation's continuous parameters are fp16 after quantize_: none is stored wider
    state = pack_state(model)[0]
    assert all(t.dtype in (torch.float16, torch.uint8)
               for k, t in state.items() if ".qweight." in k)


def test_unrounded_parameters_are_stored_wide_and_reported_so(tmp_path):
    """A tensor that is not fp16-exact is kept in its own dtype, and the bits say so."""
    model = quantized(UniformConfig(bits=2, group_size=16))
    exact = save_quantized(model, tmp_path / "a")["meta"]["bits"]
    with torch.no_grad():
        model.body[0].qweight.scale.add_(1e-4 * torch.rand_like(model.body[0].qweight.scale))
    wide = save_quantized(model, tmp_path / "b")["meta"]["bits"]
    groups = 64 * 32 // 16
    assert wide["layers"]["body.0"]["bytes"] == exact["layers"]["body.0"]["bytes"] + 2 * groups
    assert wide["linear_bits_per_param"] > exact["linear_bits_per_param"]


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a pvtune checkpoint"):
        load_quantized(build(), tmp_path / "nope")


def test_truncated_or_flipped_weights_are_detected(tmp_path):
    model = quantized()
    save_quantized(model, tmp_path)
    path = weights_path(tmp_path, read_layout(tmp_path))
    raw = bytearray(path.read_bytes())
    raw[-40:-24] = bytes(b ^ 0xFF for b in raw[-40:-24])  # 16 flipped bytes in a tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="damaged: its SHA-256 does not match"):
        load_quantized(build(), tmp_path)
    path.write_bytes(bytes(raw[:-100]))
    with pytest.raises(CheckpointError, match="damaged"):
        load_quantized(build(), tmp_path)
    path.unlink()
    with pytest.raises(CheckpointError, match="named by pvtune_layout.json, is missing"):
        load_quantized(build(), tmp_path)


def test_interrupted_first_save_is_reported_as_incomplete(tmp_path):
    save_quantized(quantized(), tmp_path)
    (tmp_path / LAYOUT_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete pvtune checkpoint.*interrupted"):
        load_quantized(build(), tmp_path)


def test_corrupted_layout(tmp_path):
    save_quantized(quantized(BinaryConfig()), tmp_path)
    (tmp_path / LAYOUT_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_quantized(build(), tmp_path)


def test_edited_layout_is_refused(tmp_path):
    save_quantized(quantized(UniformConfig(bits=2, group_size=16)), tmp_path)
    layout = json.loads((tmp_path / LAYOUT_FILE).read_text())
    layout["layers"]["body.0"]["config"]["bits"] = 3
    (tmp_path / LAYOUT_FILE).write_text(json.dumps(layout))
    with pytest.raises(CheckpointError, match="modified after it was saved"):
        load_quantized(build(), tmp_path)


def test_layout_that_misdescribes_the_codes_is_refused(tmp_path):
    """Even re-signed, a layout whose representation needs other codes than stored fails."""
    save_quantized(quantized(UniformConfig(bits=2, group_size=16)), tmp_path)
    rewrite_layout(tmp_path, lambda lay: lay["layers"]["body.0"]["config"].update(bits=3))
    with pytest.raises(CheckpointError, match=r"codes of 'body.0.qweight.codes' are stored as "
                                              r".*'bits': 2.*needs .*'bits': 3"):
        load_quantized(build(), tmp_path)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda lay: lay["layers"].update({"body.0": 5}), "layer 'body.0' needs config"),
    (lambda lay: lay.update(layers=[1, 2]), "'layers' must be an object"),
    (lambda lay: lay["dtypes"].update({"body.1.bias": "float8"}), "unknown dtype 'float8'"),
    (lambda lay: lay["packed"]["body.0.qweight.codes"].update(dtype="float32"),
     "needs dtype"),
    (lambda lay: lay["packed"]["body.0.qweight.codes"].pop("bits"),
     "malformed integer codec"),
    (lambda lay: lay.pop("packed"), "'packed' entry is missing"),
    (lambda lay: lay.update(weights={"file": "../x"}), "'weights' must name"),
], ids=["layer", "layers", "dtype", "code-dtype", "codec", "packed", "weights"])
def test_malformed_layout_entries_are_named(edit, message, tmp_path):
    save_quantized(quantized(), tmp_path)
    rewrite_layout(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(build(), tmp_path)


def test_layout_that_is_not_an_object(tmp_path):
    save_quantized(quantized(), tmp_path)
    (tmp_path / LAYOUT_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object, got list"):
        load_quantized(build(), tmp_path)


def test_non_finite_parameters_are_refused_on_save_and_load(tmp_path, monkeypatch):
    model = quantized()
    with torch.no_grad():
        model.body[0].qweight.scale[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite"):
        save_quantized(model, tmp_path)
    assert not (tmp_path / LAYOUT_FILE).exists()
    import pvtune.checkpoint.format as fmt

    monkeypatch.setattr(fmt, "_check_finite", lambda state, source: None)
    save_quantized(model, tmp_path)  # as a damaged writer would
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="'body.0.qweight.scale' has 1 non-finite"):
        load_quantized(build(), tmp_path)


def test_wrong_model(tmp_path):
    save_quantized(quantized(BinaryConfig()), tmp_path)
    with pytest.raises(CheckpointError, match="does not exist in the model"):
        load_quantized(nn.Sequential(nn.Linear(3, 3)), tmp_path)


def test_shape_and_bias_mismatch_leave_the_model_untouched(tmp_path):
    save_quantized(quantized(), tmp_path)
    other = build(seed=1)
    other.body[2] = nn.Linear(64, 32, bias=False)  # the checkpoint's layer has a bias
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="'body.2' has no bias in the model"):
        load_quantized(other, tmp_path)
    assert isinstance(other.body[0], nn.Linear)  # body.0 (checked first) was not replaced
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    wide = build(seed=1)
    wide.body[0] = nn.Linear(32, 128)
    with pytest.raises(CheckpointError, match="'body.0' is 128x32 in the model but 64x32"):
        load_quantized(wide, tmp_path)


def test_unknown_format_version(tmp_path):
    save_quantized(quantized(BinaryConfig()), tmp_path)
    rewrite_layout(tmp_path, lambda lay: lay.update(version=99))
    with pytest.raises(CheckpointError, match="unsupported format"):
        load_quantized(build(), tmp_path)


def test_resave_replaces_the_tensor_file_and_keeps_one(tmp_path):
    model = quantized()
    save_quantized(model, tmp_path)
    first = read_layout(tmp_path)["weights"]["file"]
    with torch.no_grad():
        model.body[0].bias.add_(1.0)
    save_quantized(model, tmp_path)
    second = read_layout(tmp_path)["weights"]["file"]
    assert first != second
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [second]
    fresh = build(seed=3)
    load_quantized(fresh, tmp_path)
    assert torch.equal(fresh.body[0].bias, model.body[0].bias)


def test_format_v1_checkpoints_still_load(tmp_path):
    """Checkpoints written before checksums (format v1) load, with a warning."""
    from safetensors.torch import save_file

    model = quantized()
    state, layout = pack_state(model)
    layout["version"] = 1
    save_file(state, str(tmp_path / LEGACY_WEIGHTS_FILE))
    (tmp_path / LAYOUT_FILE).write_text(json.dumps(layout))
    fresh = build(seed=1)
    load_quantized(fresh, tmp_path)
    ids = torch.arange(10)
    assert torch.equal(fresh(ids), model(ids))


def test_codes_are_packed_to_their_bit_width(tmp_path):
    model = nn.Sequential(nn.Linear(256, 256, bias=False))
    quantize_(model, UniformConfig(bits=2, group_size=64))
    save_quantized(model, tmp_path)
    payload = payload_bytes(weights_path(tmp_path, read_layout(tmp_path)))
    codes, scales, zeros = 256 * 256 * 2 / 8, 256 * 4 * 2, math.ceil(256 * 4 * 2 / 8)
    assert payload == codes + scales + zeros
