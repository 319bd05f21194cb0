from __future__ import annotations

import pytest
from torch import nn

from pvtune.llm.model import ModelError, count_params, find_blocks, load_causal_lm


def test_find_blocks_generic(model_dir):
    model, tokenizer = load_causal_lm(model_dir)
    structure = find_blocks(model)
    assert structure.path == "model.layers" and len(structure.blocks) == 2
    assert structure.linear_names(0) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]
    text = "The quick brown fox"
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_count_params_counts_tied_once(llama_dir):
    model, _ = load_causal_lm(llama_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_params(model) == sum(p.numel() for p in model.parameters())


def test_missing_directory(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_causal_lm(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_causal_lm(tmp_path)


def test_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"'bert' model \(BertModel\), not a causal"):
        load_causal_lm(tmp_path)


def test_unsupported_architecture_message():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 3, 1)

    with pytest.raises(ModelError, match="no stack of repeated blocks built from nn.Linear"):
        find_blocks(NoBlocks())


def test_gpt2_conv1d_blocks_are_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(ModelError, match="Llama, Mistral, Qwen2, Phi-3, Gemma"):
        find_blocks(model)
