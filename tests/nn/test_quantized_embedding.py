"""Compressed token embeddings: tied heads stay tied through save and load, bits drop by
exactly the bytes saved, and the PV optimizer leaves their codes alone."""

from __future__ import annotations

import copy

import pytest
import torch

from pvtune import GGUFBlockConfig, quantize_
from pvtune.errors import ConfigError
from pvtune.llm.checkpoint import bits_report, load_compressed, save_compressed
from pvtune.nn.quantize import decoder_layers, quantized_layers
from pvtune.nn.quantized_embedding import (
    EmbeddingCompression,
    QuantizedEmbedding,
    compress_embeddings_,
)
from tests.llm.conftest import ARCHITECTURES, build_model, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def compressed(kind, tokenizer, emb="q8_0", head=None):
    model = build_model(kind, len(tokenizer)).eval()
    quantize_(model, GGUFBlockConfig("q4_0"), lambda m, n: n.startswith("model.layers"))
    done = compress_embeddings_(model, EmbeddingCompression(
        GGUFBlockConfig(emb), None if head is None else GGUFBlockConfig(head)))
    return model, done


def test_tied_head_shares_the_embedding_codes(tokenizer):
    model, done = compressed("llama", tokenizer)
    assert done == {"model.embed_tokens": "gguf_block", "lm_head": "tied to the embeddings"}
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight
    ids = torch.tensor([[1, 5, 9, 42]])
    table = model.model.embed_tokens.qweight().detach()
    with torch.no_grad():
        assert torch.equal(model.model.embed_tokens(ids), table[ids])
        h = model.model(ids).last_hidden_state
        assert torch.allclose(model(ids).logits, h @ table.T, atol=1e-5)


def test_save_load_keeps_tie_and_is_bit_exact(tokenizer, tmp_path):
    model, _ = compressed("llama", tokenizer, emb="q4_0")
    ids = torch.tensor([[3, 7, 11, 13, 17]])
    with torch.no_grad():
        before = model(ids).logits
    record = save_compressed(model, tokenizer, tmp_path / "ckpt")
    loaded, _ = load_compressed(tmp_path / "ckpt")
    assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    assert torch.equal(loaded.model.embed_tokens.qweight.codes,
                       model.model.embed_tokens.qweight.codes)
    assert record["bits"]["layers"]["lm_head"]["representation"] == \
        "shared with model.embed_tokens"


def test_bits_drop_by_exactly_the_embedding_bytes(tokenizer):
    dense = build_model("llama", len(tokenizer)).eval()
    quantize_(dense, GGUFBlockConfig("q4_0"), lambda m, n: n.startswith("model.layers"))
    for p in dense.parameters():  # stored float16, as compress does
        p.data = p.data.half().float()
    model, _ = compressed("llama", tokenizer, emb="q4_0")
    a, b = bits_report(dense), bits_report(model)
    vocab, dim = model.model.embed_tokens.out_features, model.model.embed_tokens.in_features
    assert a["linear_bits_per_param"] == b["linear_bits_per_param"] == 4.5
    assert a["params_total"] == b["params_total"]
    saved = vocab * dim * 2 - vocab * dim * 4.5 / 8  # fp16 table -> q4_0 blocks
    assert a["stored_bytes"] - b["stored_bytes"] == saved


def test_untied_head_compressed_separately(tokenizer, tmp_path):
    model, done = compressed("qwen2", tokenizer, emb="q8_0", head="q4_1")
    assert done["lm_head"] == "gguf_block"
    assert model.lm_head.qweight is not model.model.embed_tokens.qweight
    save_compressed(model, tokenizer, tmp_path / "ckpt")
    loaded, _ = load_compressed(tmp_path / "ckpt")
    assert loaded.lm_head.qweight.config == GGUFBlockConfig("q4_1")
    assert torch.equal(loaded.lm_head.qweight.codes, model.lm_head.qweight.codes)


def test_pv_optimizer_leaves_embedding_codes_alone(tokenizer):
    from pvtune.optim import PVOptimizer, VStepConfig

    model, _ = compressed("llama", tokenizer)
    layers = decoder_layers(model)
    assert "model.embed_tokens" not in layers and "lm_head" not in layers
    assert len(layers) == len(quantized_layers(model)) - 2
    opt = PVOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3),
                      VStepConfig(strategy="ste", lr=0.5))
    codes = model.model.embed_tokens.qweight.codes.clone()
    ids = torch.randint(0, 300, (2, 12))
    for _ in range(2):
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    assert torch.equal(model.model.embed_tokens.qweight.codes, codes)


def test_gguf_export_writes_compressed_embeddings_as_stored(tokenizer, tmp_path):
    import numpy as np

    from pvtune.export import export_gguf, read_gguf

    model, _ = compressed("llama", tokenizer, emb="q4_1")
    export_gguf(model, tokenizer, tmp_path / "m.gguf")
    tensor = read_gguf(tmp_path / "m.gguf").tensors["token_embd.weight"]
    assert tensor.ggml_type == 3  # Q4_1, not the default q8_0
    np.testing.assert_array_equal(np.asarray(tensor.data).reshape(tensor.shape[0], -1),
                                  model.model.embed_tokens.qweight.to_gguf_blocks())


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_compressed_embeddings_keep_the_modules_behaviour(kind, tokenizer):
    """The compressed table must behave as the original module holding the decoded table:
    Gemma's embeddings scale by sqrt(hidden), padding rows stay what the table says. The
    logits equal those of the original model given the decoded table, and differ from the
    uncompressed model's by no more than a few times what the table's rounding costs."""
    model = build_model(kind, len(tokenizer)).eval()
    reference = copy.deepcopy(model)
    ids = torch.tensor([[0, 3, 7, 11, 13, 17, 250]])
    with torch.no_grad():
        exact = reference(ids).logits
    compress_embeddings_(model, EmbeddingCompression(GGUFBlockConfig("q8_0")))
    table = model.get_input_embeddings().qweight().detach()
    emb = reference.get_input_embeddings()
    with torch.no_grad():
        emb.weight.copy_(table)  # the original module, holding the decoded table
        expected = reference(ids).logits
        got = model(ids).logits
    assert type(model.get_input_embeddings().lookup) is type(emb)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    rounding = (exact - expected).abs().max()
    assert (got - exact).abs().max() <= 2 * rounding + 1e-6
    assert (got - exact).abs().max() < 0.05 * exact.abs().max()


def test_scaled_embedding_round_trips_through_a_checkpoint(tokenizer, tmp_path):
    model = build_model("gemma3", len(tokenizer)).eval()
    compress_embeddings_(model, EmbeddingCompression(GGUFBlockConfig("q4_0")))
    ids = torch.tensor([[3, 7, 11, 13, 17]])
    with torch.no_grad():
        before = model(ids).logits
    save_compressed(model, tokenizer, tmp_path / "ckpt")
    loaded, _ = load_compressed(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    assert type(loaded.get_input_embeddings().lookup).__name__ == \
        "Gemma3TextScaledWordEmbedding"
    dense = loaded.get_input_embeddings().to_embedding()
    assert type(dense).__name__ == "Gemma3TextScaledWordEmbedding"
    with torch.no_grad():
        assert torch.equal(dense(ids), loaded.get_input_embeddings()(ids))


def test_embedding_options_a_decoded_table_cannot_honour_are_refused(tokenizer):
    model = build_model("llama", len(tokenizer)).eval()
    model.model.embed_tokens.max_norm = 1.0
    with pytest.raises(ConfigError, match="max_norm"):
        compress_embeddings_(model, EmbeddingCompression(GGUFBlockConfig("q8_0")))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_dequantize_gives_back_the_embedding_module_and_keeps_the_tie(kind, tokenizer):
    """``dequantize_`` undoes compression into the plain modules: the table becomes the
    embedding class it was (not an ``nn.Linear``), a tied head shares its weight again, and
    the logits stay those of the compressed model."""
    from pvtune.nn.quantize import dequantize_

    model, _ = compressed(kind, tokenizer)
    emb_class = type(model.get_input_embeddings().lookup)
    tied = getattr(model.get_output_embeddings(), "qweight", None) \
        is model.get_input_embeddings().qweight
    assert tied == (kind != "qwen2")  # the tiny qwen2 has an untied head
    ids = torch.tensor([[0, 3, 7, 11, 250]])
    with torch.no_grad():
        before = model(ids).logits
    dequantize_(model)
    assert not quantized_layers(model)
    emb = model.get_input_embeddings()
    assert type(emb) is emb_class and isinstance(emb, torch.nn.Embedding)
    head = model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear)
    assert (head.weight is emb.weight) == tied
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
