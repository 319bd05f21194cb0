"""Tiny random causal LMs and a tiny tokenizer, built locally (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Rome was not built in a day, but its empire lasted for centuries across Europe. "
    "Rivers flow to the sea and mountains rise above the clouds in the early morning. "
) * 6


# a minimal chat template for the tiny tokenizer (each turn <|role|>text<eos>)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tokenizer(directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(directory)
    return fast


# every architecture family pvtune compresses, as tiny random models: (config class, model
# class, extra config fields); tied says whether the head shares the embedding table
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 0, "eos_token_id": 1,
                                               "bos_token_id": 1}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}),
}


def build_model(kind: str, vocab: int, **overrides):
    """A tiny random model of architecture ``kind`` (a key of :data:`ARCHITECTURES`)."""
    import transformers

    config_name, model_name, extra = ARCHITECTURES[kind]
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config = getattr(transformers, config_name)(**{**common, **extra, **overrides})
    return getattr(transformers, model_name)(config)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    with open(path, "w") as fh:
        for i in range(4):
            fh.write(json.dumps({"text": f"Document {i}. " + TEXT}) + "\n")
    return path


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tokenizer = build_tokenizer(directory)
    build_model(request.param, len(tokenizer)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama-only")
    tokenizer = build_tokenizer(directory)
    build_model("llama", len(tokenizer)).save_pretrained(directory)
    return directory
