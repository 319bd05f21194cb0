"""The rules that turn a compression request into a config, as the library owns them."""

from __future__ import annotations

import pytest

from pvtune.errors import ConfigError, UnknownNameError
from pvtune.init.aqlm import AQLMInitConfig
from pvtune.init.gptq import GPTQConfig
from pvtune.init.rtn import RTNConfig
from pvtune.llm.budget import DEFAULT_TYPES, BudgetConfig
from pvtune.llm.compress_request import CompressRequest, compress_config, default_method
from pvtune.llm.recipes import PRESETS
from pvtune.reprs import AQLMConfig, GGUFBlockConfig, UniformConfig

DEMO = PRESETS["demo"]
BUDGET = BudgetConfig.for_types(target_bytes=60 * 2**20)


def test_the_default_initialiser_follows_what_is_asked():
    assert default_method(CompressRequest()) == "aqlm"
    assert default_method(CompressRequest(format="q2_0")) == "gptq"
    assert default_method(CompressRequest(budget=BUDGET)) == "gptq"
    assert default_method(CompressRequest(method="rtn", format="q2_0")) == "rtn"
    with pytest.raises(UnknownNameError, match="unknown initialisation method 'magic'"):
        CompressRequest(method="magic")


def test_scalar_grids_get_no_block_finetuning_unless_asked():
    config = compress_config(CompressRequest(method="gptq", bits=3, group_size=16), DEMO)
    assert config.representation == UniformConfig(bits=3, group_size=16)
    assert isinstance(config.method_config, GPTQConfig) and config.block_finetune is None
    asked = compress_config(CompressRequest(method="rtn", block_finetune_steps=5), DEMO)
    assert isinstance(asked.method_config, RTNConfig)
    assert asked.block_finetune.steps == 5 and asked.block_finetune.lr == DEMO.block_finetune.lr


def test_aqlm_takes_the_presets_search_and_fine_tuning():
    config = compress_config(CompressRequest(codebooks="1x8g8"), DEMO)
    assert isinstance(config.representation, AQLMConfig)
    assert config.representation.num_codebooks == 1
    assert config.method_config == DEMO.aqlm and isinstance(config.method_config, AQLMInitConfig)
    assert config.block_finetune == DEMO.block_finetune
    assert config.calibration.num_sequences == DEMO.calibration.num_sequences
    with pytest.raises(ConfigError, match="needs a scalar initialiser"):
        compress_config(CompressRequest(method="aqlm", format="q4_0"), DEMO)


def test_a_budget_chooses_the_types_itself():
    config = compress_config(CompressRequest(budget=BUDGET, num_sequences=4), DEMO)
    assert config.budget == BUDGET and config.representation == GGUFBlockConfig("q4_0")
    assert config.calibration.num_sequences == 4 and config.block_finetune is None
    for bad in (CompressRequest(budget=BUDGET, format="q2_0"),
                CompressRequest(budget=BUDGET, embeddings="q8_0"),
                CompressRequest(budget=BUDGET, method="aqlm")):
        with pytest.raises(ConfigError, match="chooses every tensor's GGUF block type"):
            compress_config(bad, DEMO)


def test_budget_types_give_the_embeddings_the_block_types_among_them():
    assert BUDGET.types == DEFAULT_TYPES
    mixed = BudgetConfig.for_types(target_bits=3.0, types=("q2_0", "f16"))
    assert mixed.types == ("q2_0", "f16") and mixed.embedding_types == ("q2_0",)
    dense = BudgetConfig.for_types(target_bits=3.0, types=("f16",))
    assert dense.embedding_types == ("f16",)


def test_config_record_is_json_with_class_names():
    import json

    from pvtune.llm.checkpoint import config_record

    record = config_record(compress_config(CompressRequest(budget=BUDGET), DEMO))
    assert record["type"] == "CompressConfig" and record["method"] == "gptq"
    assert record["budget"]["type"] == "BudgetConfig"
    assert record["budget"]["types"] == list(DEFAULT_TYPES)
    assert json.loads(json.dumps(record)) == record
