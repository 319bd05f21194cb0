"""Teacher-written chat data: conversations rendered through the chat template, seeded and
cached (a longer stream extends a shorter one), mixed with text so every prefix holds both."""

from __future__ import annotations

import pytest
import torch

from pvtune.errors import ConfigError, DataError
from pvtune.llm.chat_data import (
    ChatDataConfig,
    chat_sequences,
    interleave,
    user_prefix,
    write_conversations,
)
from tests.llm.conftest import CHAT_TEMPLATE as TEMPLATE
from tests.llm.conftest import build_model, build_tokenizer


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("chat-tok"))
    tok.chat_template = TEMPLATE
    model = build_model("llama", len(tok)).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def test_the_user_prefix_is_what_the_template_puts_before_the_message(chat_model):
    _, tok = chat_model
    assert user_prefix(tok) == "<|user|>"


def test_a_tokenizer_without_template_is_refused(tmp_path):
    with pytest.raises(DataError, match="chat template"):
        user_prefix(build_tokenizer(tmp_path))


def test_conversations_are_seeded_and_rendered_through_the_template(chat_model):
    model, tok = chat_model
    config = ChatDataConfig(question_tokens=6, answer_tokens=6, batch_size=3, seed=1)
    a = write_conversations(model, tok, config, 200, progress=False)
    b = write_conversations(model, tok, config, 200, progress=False)
    assert a.shape == (200,) and torch.equal(a, b)
    longer = write_conversations(model, tok, config, 320, progress=False)
    assert torch.equal(longer[:200], a)  # batch after batch: a longer run extends a shorter
    other = write_conversations(model, tok, ChatDataConfig(question_tokens=6, answer_tokens=6,
                                                           batch_size=3, seed=2), 200,
                                progress=False)
    assert not torch.equal(other, a)
    text = tok.decode(a)
    assert text.startswith("<|user|>") and "<|assistant|>" in text


def test_sequences_are_cached_and_reused(chat_model, tmp_path, monkeypatch):
    model, tok = chat_model
    config = ChatDataConfig(question_tokens=6, answer_tokens=6, batch_size=3)
    first = chat_sequences(model, tok, config, 4, 32, "fp", tmp_path, progress=False)
    assert first.shape == (4, 32) and len(list(tmp_path.glob("chat-*.safetensors"))) == 1

    def fail(*a, **k):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr("pvtune.llm.chat_data.write_conversations", fail)
    again = chat_sequences(model, tok, config, 8, 16, "fp", tmp_path, progress=False)
    assert torch.equal(again.reshape(-1), first.reshape(-1))  # the same stream, cut anew


def test_interleave_alternates_rows():
    a, b = torch.zeros(3, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    mixed = interleave(a, b)
    assert mixed[:, 0].tolist() == [0, 1, 0, 0]
    with pytest.raises(DataError, match="cannot mix"):
        interleave(a, torch.ones(2, 5, dtype=torch.long))


def test_config_is_validated():
    with pytest.raises(ConfigError):
        ChatDataConfig(top_p=0.0)
    with pytest.raises(ConfigError):
        ChatDataConfig(batch_size=0)


def test_the_training_pool_mixes_text_and_chat_at_the_asked_ratio(chat_model, tmp_path,
                                                                  monkeypatch):
    from pvtune.llm.chat_data import add_chat_data
    from pvtune.llm.finetune import FinetuneConfig, batch_indices

    model, tok = chat_model
    monkeypatch.setenv("PVTUNE_CACHE", str(tmp_path))
    text = torch.randint(2, 300, (6, 16), generator=torch.Generator().manual_seed(0))
    pool, record = add_chat_data(model, tok, text, 2, "fp", seed=0)
    assert record["sequences"] == 2 and pool.shape == (8, 16)
    is_text = [any(torch.equal(row, t) for t in text) for row in pool]
    assert sum(is_text) == 6  # every text row once, the two chat rows beside them
    # the loader draws every row of the pool equally often: chat is 2 of 8 of what it yields
    config = FinetuneConfig(steps=400, batch_size=2)
    drawn = torch.cat([batch_indices(config, s, 0, pool.shape[0]) for s in range(400)])
    share = sum(not is_text[i] for i in drawn.tolist()) / drawn.numel()
    assert abs(share - 2 / 8) < 0.03
