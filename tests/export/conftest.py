"""Tiny models wide enough for every GGUF block type and AQLM 2x8g8 (rows of 128)."""

from __future__ import annotations

import pytest
import torch

from tests.llm.conftest import build_tokenizer


def tiny(kind: str, tokenizer, hidden: int = 128):
    """A tiny model wide enough for every block type (rows of 128; ``hidden=256`` for
    TQ2_0's blocks of 256)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


