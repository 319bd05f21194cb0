"""The BOS decision follows llama.cpp's rule, and is applied the same way everywhere."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pvtune.llm.bos import (
    SOURCE_FILE,
    BosChoice,
    decide_bos,
    model_logits,
    run_bos,
    with_bos,
)
from pvtune.llm.evaluate import perplexity
from pvtune.llm.model import load_causal_lm


@pytest.fixture
def tiny(llama_dir, tmp_path):
    """A copy of the tiny Llama whose tokenizer adds no BOS, with bos_token_id 1."""
    directory = tmp_path / "m"
    shutil.copytree(llama_dir, directory)
    model, tokenizer = load_causal_lm(directory)
    model.config.bos_token_id = 1
    return directory, model, tokenizer


def test_the_rule_in_order(tiny):
    directory, model, tokenizer = tiny
    config = model.config
    choice = decide_bos(directory, tokenizer, config)
    assert not choice.add and "adds none" in choice.reason
    config.model_type = "gemma"  # a GGUF-converted Gemma: the tokenizer adds none, but...
    choice = decide_bos(directory, tokenizer, config)
    assert choice.add and choice.token_id == 1 and "gemma architecture" in choice.reason
    config.model_type = "llama"
    tok_config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**tok_config,
                                                                 "add_bos_token": True}))
    assert decide_bos(directory, tokenizer, config).reason == \
        "tokenizer_config.json add_bos_token=true"
    (directory / SOURCE_FILE).write_text(json.dumps(
        {"gguf_metadata": {"tokenizer.ggml.add_bos_token": False}}))
    choice = decide_bos(directory, tokenizer, config)  # the GGUF flag wins
    assert not choice.add and choice.reason == "GGUF tokenizer.ggml.add_bos_token=false"
    assert decide_bos(directory, tokenizer, config, override=True).add  # --bos wins it all


def test_a_checkpoints_recorded_choice_runs_it_unless_overridden(tiny):
    directory, model, tokenizer = tiny
    recorded = {"bos": {"add": True, "token_id": 1, "reason": "recorded"}}
    assert run_bos(directory, tokenizer, model.config, meta=recorded) == BosChoice(True, 1,
                                                                                  "recorded")
    assert not run_bos(directory, tokenizer, model.config, False, recorded).add
    # no record: the rule, as decide_bos gives it
    assert run_bos(directory, tokenizer, model.config, meta={}) == \
        decide_bos(directory, tokenizer, model.config)


def test_a_tokenizer_that_adds_bos_itself(tiny):
    directory, model, tokenizer = tiny

    class Adds:
        bos_token_id = 7

        def __call__(self, text, add_special_tokens=True):
            class Out:
                input_ids = [7, 100] if add_special_tokens else [100]
            return Out()

    choice = decide_bos(None, Adds(), model.config)
    assert choice == BosChoice(True, 7, "the tokenizer adds it")


def test_bos_is_prepended_and_its_logits_dropped(tiny):
    _, model, _ = tiny
    ids = torch.randint(2, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    choice = BosChoice(True, 1, "test")
    assert torch.equal(with_bos(ids, choice)[:, 0], torch.ones(2, dtype=torch.long))
    assert torch.equal(with_bos(ids, BosChoice(False, None, "no")), ids)
    with torch.no_grad():
        full = model(input_ids=with_bos(ids, choice)).logits
        assert torch.equal(model_logits(model, ids, choice), full[:, 1:])
    # the scored tokens are the same with and without BOS: only the context differs
    a = perplexity(model, ids, progress=False)
    b = perplexity(model, ids, progress=False, bos=choice)
    assert a.tokens == b.tokens == 2 * 9 and a.perplexity != b.perplexity


def test_choice_records_round_trip_and_malformed_ones_are_named():
    choice = BosChoice(True, 1, "the tokenizer adds it")
    assert BosChoice.from_dict(choice.to_dict()) == choice
    with pytest.raises(ValueError, match="malformed BOS record"):
        BosChoice.from_dict({"add": "yes"})
    with pytest.raises(ValueError, match="no bos_token_id"):
        BosChoice(True, None, "x")


def test_diverged_model_perplexity_is_inf_not_an_overflow(tiny):
    _, model, _ = tiny
    with torch.no_grad():
        model.lm_head.weight.mul_(1e6)  # absurdly confident wrong logits
    ids = torch.randint(2, 300, (2, 10), generator=torch.Generator().manual_seed(1))
    assert perplexity(model, ids, progress=False).perplexity == float("inf")
