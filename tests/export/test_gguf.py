"""GGUF export: the file's metadata and tensors, import back bit for bit, and (slow, with
``pvtune[llamacpp]`` installed) llama.cpp itself reproducing pvtune's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pvtune import GGUFBlockConfig, quantize_
from pvtune.cli import main
from pvtune.export import GGUFExportConfig, export_gguf, import_gguf_linears, read_gguf
from pvtune.export.gguf import rotary_row_order
from pvtune.llm.checkpoint import load_compressed
from pvtune.nn.quantize import quantized_layers
from tests.export.conftest import tiny

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("wide-llama")
    tokenizer.save_pretrained(directory)
    tiny("llama", tokenizer).save_pretrained(directory)
    return directory


def width_for(block_type: str) -> int:
    return 256 if block_type == "tq2_0" else 128


def compressed_model(kind, tokenizer, block_type):
    model = tiny(kind, tokenizer, width_for(block_type))
    quantize_(model, GGUFBlockConfig(block_type), lambda m, n: n.startswith("model.layers"))
    return model


def test_rotary_row_order_is_transformers_inverse():
    """transformers' GGUF loader undoes llama.cpp's rotary order with its own reverse
    permutation; applying ours to its output gives back the rows it read."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    n_head, rows = 4, 32
    w = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    ggml = w[rotary_row_order(rows, n_head)]
    processor = LlamaTensorProcessor(config={"num_attention_heads": n_head,
                                             "num_key_value_heads": n_head})
    back = processor.process(ggml, "blk.0.attn_q.weight").weights
    np.testing.assert_array_equal(back, w)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("block_type", ["q2_0", "q4_1", "q1_0", "tq2_0"])
def test_export_then_import_is_bit_exact(kind, block_type, tokenizer, tmp_path):
    model = compressed_model(kind, tokenizer, block_type)
    report = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    fresh = tiny(kind, tokenizer, width_for(block_type))
    import_gguf_linears(fresh, tmp_path / "m.gguf")
    ours, theirs = quantized_layers(model), quantized_layers(fresh)
    assert ours.keys() == theirs.keys() and len(ours) == 14
    for name, layer in ours.items():
        a, b = layer.qweight, theirs[name].qweight
        assert torch.equal(a.codes, b.codes), name
        assert torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset), name
        if layer.bias is not None:
            assert torch.equal(layer.bias, theirs[name].bias)
    assert report.linear_bits_per_param == GGUFBlockConfig(block_type).format.bits_per_weight


def test_file_metadata_and_tensor_types(tokenizer, tmp_path):
    model = compressed_model("llama", tokenizer, "q2_0")
    export_gguf(model, tokenizer, tmp_path / "m.gguf", GGUFExportConfig(embedding_type="q4_0"))
    contents = read_gguf(tmp_path / "m.gguf")
    md, tensors = contents.metadata, contents.tensors
    assert md["general.architecture"] == "llama"
    assert md["llama.block_count"] == 2 and md["llama.embedding_length"] == 128
    assert md["llama.attention.head_count"] == 4 and md["llama.attention.head_count_kv"] == 2
    assert md["llama.rope.dimension_count"] == 32 and md["llama.feed_forward_length"] == 256
    assert md["general.file_type"] == 41  # LLAMA_FTYPE_MOSTLY_Q2_0
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.pre"] == "gpt-2"
    assert md["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i)
                                           for i in range(len(tokenizer))]
    assert md["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert md["tokenizer.ggml.add_bos_token"] is False
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].ggml_type == 2  # Q4_0
    assert tensors["blk.1.ffn_down.weight"].ggml_type == 42
    assert tensors["blk.1.ffn_down.weight"].shape == (128, 256)
    assert tensors["output_norm.weight"].ggml_type == 0
    # the embedding as llama.cpp decodes it (the gguf package's Q4_0) is pvtune's Q4_0 fit
    import gguf

    emb = gguf.quants.dequantize(np.asarray(tensors["token_embd.weight"].data).reshape(
        len(tokenizer), -1), gguf.GGMLQuantizationType.Q4_0)
    ref = model.get_input_embeddings().weight.detach()
    err = float(((torch.from_numpy(emb) - ref) ** 2).sum() / (ref ** 2).sum())
    assert err < 0.01


def test_cli_compress_format_then_export(wide_llama_dir, text_file, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["compress", str(wide_llama_dir), "--method", "gptq", "--format", "q2_0",
                 "--calib-text", str(text_file), "--no-eval", "--num-seqs", "2", "--seq-len",
                 "16", "--max-new-tokens", "0", "--output", str(ckpt)]) == 0
    assert "GGUF Q2_0" in capsys.readouterr().out
    assert main(["export", str(ckpt), "--to", "gguf", "--output", str(tmp_path / "m.gguf")]) == 0
    out = capsys.readouterr().out
    assert "q2_0: 14" in out and "llama-cli -m" in out
    model, _ = load_compressed(ckpt)
    fresh, _ = load_compressed(ckpt)
    for layer in quantized_layers(fresh).values():
        layer.qweight.codes.zero_()
    import_gguf_linears(fresh, tmp_path / "m.gguf")
    for name, layer in quantized_layers(model).items():
        assert torch.equal(layer.qweight.codes, quantized_layers(fresh)[name].qweight.codes)
    # the file exists now: refused without --overwrite, one line, exit 2
    assert main(["export", str(ckpt), "--output", str(tmp_path / "m.gguf")]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("failure", [OSError("34816 requested and 4384 written"),
                                     KeyboardInterrupt()])
def test_a_failed_or_interrupted_export_leaves_no_partial_file(failure, tokenizer, tmp_path,
                                                               monkeypatch):
    import gguf

    from pvtune.errors import OutputError

    def fail(self, *a, **k):
        raise failure

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", fail)
    model = compressed_model("llama", tokenizer, "q4_0")
    expected = OutputError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as err:
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    if expected is OutputError:
        assert str(err.value) == (f"cannot write {tmp_path / 'm.gguf'}: 34816 requested and "
                                  "4384 written; no file was written")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_of_a_non_gguf_checkpoint_says_what_to_do(llama_dir, text_file, tmp_path,
                                                             capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["compress", str(llama_dir), "--method", "rtn", "--bits", "4", "--group-size",
                 "16", "--calib-text", str(text_file), "--no-eval", "--num-seqs", "2",
                 "--seq-len", "16", "--max-new-tokens", "0", "--output", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["export", str(ckpt), "--output", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert "--format q4_0" in err and "Traceback" not in err
    assert not (tmp_path / "m.gguf").exists()


def assert_llamacpp_matches(model, tokenizer, path, tolerance: float = 0.02) -> None:
    """llama.cpp's logits for the GGUF file ``path`` are ``model``'s to ``tolerance`` of
    their range, with the same next token at 95% of the positions or more."""
    from pvtune.export.llamacpp import load_llamacpp

    ids = tokenizer("The quick brown fox jumps over the lazy dog. Rome was not built in a "
                    "day, but its empire lasted")["input_ids"]
    llm = load_llamacpp(path, n_ctx=64)
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < tolerance * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.95


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("block_type", ["q4_0", "q4_1", "q8_0", "q2_0", "q1_0", "tq2_0"])
def test_llama_cpp_reproduces_pvtune_logits(kind, block_type, tokenizer, tmp_path):
    """llama.cpp (quantizing activations to 8 bits inside its matmuls) gives the logits
    pvtune gives, to 2% of their range, and the same next token everywhere."""
    pytest.importorskip("llama_cpp", reason="needs pip install 'pvtune[llamacpp]'")
    model = compressed_model(kind, tokenizer, block_type)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", GGUFExportConfig(embedding_type="f32"))
    assert_llamacpp_matches(model, tokenizer, tmp_path / "m.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llama_cpp_runs_a_rotated_mixed_type_file(kind, tokenizer, tmp_path):
    """A model rotated (R1 + R2, head untied) and compressed to a size budget, so its tensors
    hold several GGUF block types and some stay F16: llama.cpp loads the file and gives
    pvtune's logits."""
    pytest.importorskip("llama_cpp", reason="needs pip install 'pvtune[llamacpp]'")
    from pvtune.export.gguf import gguf_metadata_bytes
    from pvtune.llm.budget import BudgetConfig
    from pvtune.llm.pipeline import CompressConfig, compress_model
    from pvtune.rotation import RotationConfig

    model = tiny(kind, tokenizer)
    ids = torch.randint(0, len(tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    floor = 200_000
    config = CompressConfig(method="gptq", representation=GGUFBlockConfig("q4_0"),
                            rotation=RotationConfig(),
                            budget=BudgetConfig(target_bytes=floor + 60_000))
    report = compress_model(model, ids, config, progress=False,
                            metadata_bytes=gguf_metadata_bytes(model, tokenizer))
    assert len(set(report.plan.types.values())) >= 2
    assert report.rotation.untied_head == (kind == "llama")  # qwen2's head is its own
    written = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert written.file_bytes <= report.plan.budget_bytes
    assert_llamacpp_matches(model, tokenizer, tmp_path / "m.gguf")


def test_verification_tolerance_is_the_libraries():
    from pvtune.export.llamacpp import VERIFY_TOLERANCE, Verification

    assert VERIFY_TOLERANCE == 0.03
    assert Verification(10.0, 10.29).agrees and not Verification(10.0, 10.31).agrees
    assert not Verification(10.0, 9.69).agrees
    assert Verification(10.0, 10.5, tolerance=0.06).agrees


def tiny_family(kind: str, tokenizer):
    """A tiny Phi-3 (fused qkv and gate/up projections) or Gemma-3 (norms of 1 + w, scaled
    embeddings, sliding and global layers) with random norm weights, rows of 128."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)
    if kind == "phi3":
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
            **common, pad_token_id=0, eos_token_id=1, bos_token_id=1,
            tie_word_embeddings=False))
    else:
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **common, head_dim=32, query_pre_attn_scalar=32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return model.eval()


def test_gemma3_settings_llama_cpp_would_ignore_are_refused(tokenizer, tmp_path):
    from pvtune.errors import ModelError

    model = tiny_family("gemma3", tokenizer)
    model.config.query_pre_attn_scalar = 256
    with pytest.raises(ModelError, match="query_pre_attn_scalar 256 != head_dim 32"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_gemma3_norms_are_written_as_one_plus_w(tokenizer, tmp_path):
    model = tiny_family("gemma3", tokenizer)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", GGUFExportConfig(embedding_type="f32"))
    norms = {name: np.asarray(t.data).view(np.float32)
             for name, t in read_gguf(tmp_path / "m.gguf").tensors.items()
             if name.endswith("norm.weight")}
    np.testing.assert_allclose(norms["blk.0.post_ffw_norm.weight"],
                               1 + model.model.layers[0].post_feedforward_layernorm.weight
                               .detach().numpy(), rtol=1e-6)
    assert {"blk.0.attn_q_norm.weight", "output_norm.weight"} <= set(norms)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["phi3", "gemma3"])
def test_llama_cpp_runs_phi3_and_gemma3_files(kind, tokenizer, tmp_path):
    """llama.cpp reproduces pvtune's logits for the Phi-3 and Gemma-3 families, dense and
    with Q4_0 decoder linears."""
    pytest.importorskip("llama_cpp", reason="needs pip install 'pvtune[llamacpp]'")
    model = tiny_family(kind, tokenizer)
    export_gguf(model, tokenizer, tmp_path / "dense.gguf",
                GGUFExportConfig(embedding_type="f32", dense_type="f32"))
    assert_llamacpp_matches(model, tokenizer, tmp_path / "dense.gguf")
    quantize_(model, GGUFBlockConfig("q4_0"), lambda m, n: n.startswith("model.layers"))
    export_gguf(model, tokenizer, tmp_path / "q4_0.gguf", GGUFExportConfig(embedding_type="f32"))
    # llama.cpp quantizes activations to 8 bits inside Q4_0 matmuls; Gemma's sqrt(hidden)
    # embedding scale makes that a little coarser relative to these small logits
    assert_llamacpp_matches(model, tokenizer, tmp_path / "q4_0.gguf", tolerance=0.03)
