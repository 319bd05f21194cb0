"""Quantization-aware SFT: the loss sees answer tokens only; instruction files in each format
are read (and bad ones refused in one line); every weight mode lowers the loss and saves a
checkpoint that reloads bit for bit; the offline data's reader survives its truncated file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pvtune.cli import main
from pvtune.errors import DataError
from pvtune.llm.activation_quant import ActivationKVConfig
from pvtune.llm.assets import sharegpt_conversations, write_sft_pairs
from pvtune.llm.checkpoint import load_compressed, read_meta, save_compressed
from pvtune.llm.kv_quant import KVQuantizer
from pvtune.llm.sft import SFTConfig, rouge_l, sft
from pvtune.llm.sft_data import (
    IGNORE,
    SFTExample,
    answer_loss,
    collate,
    read_sft_examples,
    tokenize_example,
    tokenize_examples,
)
from pvtune.nn import QuantizedLinear
from tests.llm.conftest import CHAT_TEMPLATE as TEMPLATE
from tests.llm.conftest import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = build_tokenizer(tmp_path_factory.mktemp("sft-tok"))
    tok.chat_template = TEMPLATE
    return tok


def examples(n: int = 40) -> list[SFTExample]:
    return [SFTExample((("user", f"What is {i} plus {i}?"),), f"It is {2 * i}.")
            for i in range(n)]


def test_prompt_tokens_are_masked_out_of_the_loss(tokenizer):
    ids, labels = tokenize_example(tokenizer, examples()[3], 64)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 3 plus 3?"}],
                                           add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    assert labels[:len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] and len(ids) > len(prompt)
    batch = collate([(ids, labels)], 0)
    logits = torch.randn(1, len(ids), 300)
    changed = logits.clone()
    changed[0, :len(prompt) - 1] += 5 * torch.randn(len(prompt) - 1, 300)  # prompt positions
    torch.testing.assert_close(answer_loss(changed, batch.labels),
                               answer_loss(logits, batch.labels))
    answer = torch.nn.functional.cross_entropy(logits[0, len(prompt) - 1:-1],
                                               torch.tensor(ids[len(prompt):]))
    torch.testing.assert_close(answer_loss(logits, batch.labels), answer)


def test_a_prompt_longer_than_the_limit_is_skipped_and_an_answer_cut(tokenizer):
    long = SFTExample((("user", "word " * 200),), "short")
    assert tokenize_example(tokenizer, long, 32) is None
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                           add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    limit = len(prompt) + 5
    ids, labels = tokenize_example(tokenizer, SFTExample((("user", "hi"),), "a " * 100), limit)
    assert len(ids) == len(labels) == limit and labels[-5:] == ids[-5:]
    with pytest.raises(DataError, match="no example fits"):
        tokenize_examples(tokenizer, [long], 32)


def test_every_file_format_is_read_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [{"prompt": "p1", "response": "r1"},
             {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "p2"},
                           {"role": "assistant", "content": "r2"}]},
             {"conversations": [{"from": "human", "value": "p3"}, {"from": "gpt", "value": "r3"}]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    got = read_sft_examples(path)
    assert [e.prompt for e in got] == ["p1", "p2", "p3"]
    assert [e.response for e in got] == ["r1", "r2", "r3"]
    assert got[1].messages == (("system", "s"), ("user", "p2"))
    for bad, message in ((["{"], ":1: not valid JSON"), ([json.dumps({"text": "x"})], "prompt and"),
                         ([json.dumps({"messages": [{"role": "user", "content": "a"},
                                                    {"role": "user", "content": "b"}]})],
                          "assistant's answer")):
        path.write_text("\n".join(bad))
        with pytest.raises(DataError, match=message):
            read_sft_examples(path)
    with pytest.raises(DataError, match="does not exist"):
        read_sft_examples(tmp_path / "missing.jsonl")


def test_the_tokenizer_needs_a_chat_template(tmp_path):
    plain = build_tokenizer(tmp_path)
    with pytest.raises(DataError, match="chat template"):
        tokenize_example(plain, examples()[0], 64)


@pytest.mark.parametrize("mode", ["float", "ste", "pv"])
def test_each_weight_mode_learns_and_saves_a_checkpoint_that_reloads_exactly(
        tokenizer, tmp_path, mode):
    items = tokenize_examples(tokenizer, examples(), 64)
    model = build_model("llama", len(tokenizer), hidden_size=48, intermediate_size=96)
    config = SFTConfig(weights=mode, steps=25, lr=3e-3, selection_samples=4,
                       activations=ActivationKVConfig())
    result = sft(model, items[:32], items[32:], config, pad_id=0, progress=False)
    assert result.eval_after < result.eval_before - 0.5  # held-out answers got better
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert result.rotations is not None and result.rotations.residual
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert bool(layers) == (mode != "float")
    save_compressed(model, tokenizer, tmp_path / mode, meta=result.to_dict())
    loaded, _ = load_compressed(tmp_path / mode)
    ids = torch.tensor([items[0][0]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert sum(isinstance(m, KVQuantizer) for m in loaded.modules()) == 2


def test_rouge_l_on_hand_made_texts():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    # LCS "the cat the mat" = 4 of 6 and 4 of 5 words
    assert rouge_l("the cat sat on the mat", "The cat ate the mat") == pytest.approx(
        2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert rouge_l("", "x") == 0.0 and rouge_l("a b", "c d") == 0.0


def test_the_sharegpt_reader_keeps_every_record_before_a_cut(tmp_path):
    good = [{"id": f"x{i}", "conversations": [
        {"from": "human", "value": f"Question number {i} about something long enough?"},
        {"from": "gpt", "value": f"Answer number {i}, which is also long enough to keep."}]}
        for i in range(12)]
    text = json.dumps(good)[:-1] + ', {"id": "broken", "conversations": [{"from": "hu'
    assert [r["id"] for r in sharegpt_conversations(text)] == [f"x{i}" for i in range(12)]
    source = tmp_path / "share.json"
    source.write_text(text)
    write_sft_pairs(source, tmp_path / "out")
    train = (tmp_path / "out" / "train.jsonl").read_text().splitlines()
    evaluation = (tmp_path / "out" / "evaluation.jsonl").read_text().splitlines()
    assert len(train) == 11 and len(evaluation) == 1  # every tenth pair held out
    assert json.loads(evaluation[0])["id"] == "x9"


def test_pvtune_sft_runs_end_to_end_and_reports(llama_dir, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TEMPLATE
    config_path.write_text(json.dumps(config))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": e.prompt, "response": e.response})
                              for e in examples(30)))
    out = tmp_path / "sft-out"
    args = ["sft", str(model_dir), "--data", str(data), "--steps", "4", "--lr", "1e-3",
            "--max-length", "48", "--answers", "2", "--max-new-tokens", "4",
            "--output", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "answer perplexity before -> after" in printed and "ROUGE-L" in printed
    meta = read_meta(out)
    assert meta["training_examples"] == 27 and meta["evaluation"]["examples"] == 3
    assert len(meta["answers"]) == 2 and "activation_rotations" in meta
    assert main(args) == 2  # the output now holds a checkpoint
    assert "not empty" in capsys.readouterr().err
