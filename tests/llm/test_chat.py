"""Streaming generation with speed figures, and multi-turn chat (library and CLI)."""

from __future__ import annotations

import io

import pytest
import torch

from pvtune.cli import main
from pvtune.errors import DataError
from pvtune.llm.chat import ChatSession, stream_generate
from pvtune.llm.model import load_causal_lm

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_dir(llama_dir, tmp_path_factory):
    import shutil

    directory = tmp_path_factory.mktemp("chat-model")
    shutil.copytree(llama_dir, directory, dirs_exist_ok=True)
    _, tokenizer = load_causal_lm(directory)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def test_stream_generate_streams_what_it_returns(llama_dir):
    model, tokenizer = load_causal_lm(llama_dir)
    pieces = []
    ids = tokenizer("The quick brown", return_tensors="pt").input_ids
    text, stats = stream_generate(model, tokenizer, ids, 12, pieces.append)
    assert "".join(pieces) == text and stats.new_tokens == 12
    assert stats.prompt_tokens == ids.shape[1]
    assert stats.prefill_tokens_per_second > 0 and stats.decode_tokens_per_second > 0
    with torch.no_grad():  # greedy: the same tokens as generate()
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    assert text == tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_keeps_history_and_resets(chat_dir):
    model, tokenizer = load_causal_lm(chat_dir)
    session = ChatSession(model, tokenizer, system="be brief", max_new_tokens=6)
    first, _ = session.reply("hello there")
    session.reply("and again")
    assert [t["role"] for t in session.history] == ["user", "assistant"] * 2
    assert session.history[1]["content"] == first.strip()
    session.reset()
    assert session.history == []
    with pytest.raises(DataError, match="empty"):
        session.reply("   ")


def test_chat_without_template_says_what_to_use(llama_dir):
    model, tokenizer = load_causal_lm(llama_dir)
    with pytest.raises(DataError, match="pvtune generate"):
        ChatSession(model, tokenizer)


def test_cli_chat_reads_turns_from_stdin(chat_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\n/reset\nagain\n/exit\nignored\n"))
    assert main(["chat", str(chat_dir), "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("tok/s]") == 2  # two replies, each with its speed
    assert "(conversation reset)" in captured.err


def test_cli_generate_reports_decode_speed(llama_dir, capsys):
    assert main(["generate", str(llama_dir), "--prompt", "The quick", "--max-new-tokens",
                 "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The quick")
    assert "decode 6 tokens at" in captured.err


def test_generation_past_the_context_window_is_refused(chat_dir, capsys):
    """The tiny model's context holds 256 tokens: a longer request is refused up front, in
    the library and on the command line (not generated until killed)."""
    from pvtune.llm.evaluate import generate
    from tests.test_cli import error_of

    model, tokenizer = load_causal_lm(chat_dir)
    ids = tokenizer("The quick brown", return_tensors="pt").input_ids
    room = 256 - ids.shape[1]
    with pytest.raises(DataError, match=f"context window of 256 tokens; ask for at most {room}"):
        stream_generate(model, tokenizer, ids, room + 1)
    assert stream_generate(model, tokenizer, ids, 2)[1].new_tokens == 2
    with pytest.raises(DataError, match="context window of 256"):
        generate(model, tokenizer, "The quick brown", max_new_tokens=100_000_000)
    with pytest.raises(DataError, match="context window"):
        ChatSession(model, tokenizer, max_new_tokens=1000)
    assert main(["generate", str(chat_dir), "--prompt", "The quick",
                 "--max-new-tokens", "100000000"]) == 2
    assert "context window of 256 tokens" in error_of(capsys)
    # a chat that outgrows the window says so and goes on
    session = ChatSession(model, tokenizer, max_new_tokens=250)
    with pytest.raises(DataError, match="context window"):
        session.reply("hello " * 40)
    assert session.history == []
