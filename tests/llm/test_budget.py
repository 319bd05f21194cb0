"""The size budget: sizes parse, the allocator respects the budget and spends it where the
cost is, the file written fits, more bytes never measure worse, and a mixed-type checkpoint
saves, exports to GGUF, imports back and trains like any other."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pvtune.errors import ConfigError
from pvtune.export.gguf import export_gguf, gguf_metadata_bytes, import_gguf_linears
from pvtune.llm.budget import (
    DENSE,
    EMBEDDINGS,
    GGUF_TENSOR_OVERHEAD,
    BudgetConfig,
    TensorOptions,
    allocate,
    budget_tensors,
    measure_options,
    parse_size,
    type_bytes,
)
from pvtune.llm.checkpoint import load_compressed, save_compressed
from pvtune.llm.data import CalibrationConfig, calibration_batch, tokenize_stream
from pvtune.llm.finetune import FinetuneConfig, finetune
from pvtune.llm.pipeline import CompressConfig, compress_model
from pvtune.llm.teacher_logits import TeacherLogits
from pvtune.nn.quantize import quantized_layers
from pvtune.optim import VStepConfig
from pvtune.optim.strategies import STRATEGIES
from pvtune.reprs import GGUFBlockConfig
from tests.llm.conftest import TEXT, build_model, build_tokenizer

# every GGUF block type fits 64-wide rows; larger initial weights make the outputs far from
# uniform, so that quantization errors show in the KL
WIDE = dict(hidden_size=64, intermediate_size=128, initializer_range=0.2)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def ids(tokenizer):
    stream = tokenize_stream(tokenizer, [TEXT])
    return calibration_batch(stream, CalibrationConfig(num_sequences=6, sequence_length=32))


def wide_model(tokenizer, kind="llama"):
    return build_model(kind, len(tokenizer), **WIDE).eval()


def kl_to(reference, model, ids) -> float:
    """Mean per-token KL(reference || model) on ``ids``."""
    with torch.no_grad():
        p = torch.log_softmax(reference(input_ids=ids).logits, -1)
        q = torch.log_softmax(model(input_ids=ids).logits, -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_sizes_parse():
    assert parse_size("60MiB") == 60 * 2**20
    assert parse_size("59.5 MB") == 59_500_000
    assert parse_size("1024") == 1024
    assert parse_size("2kib") == 2048
    for bad in ("", "60 parsecs", "-3MiB", "0", "MiB"):
        with pytest.raises(ConfigError, match="size"):
            parse_size(bad)


def test_budget_config_is_validated():
    with pytest.raises(ConfigError, match="exactly one"):
        BudgetConfig()
    with pytest.raises(ConfigError, match="exactly one"):
        BudgetConfig(target_bytes=10, target_bits=2.0)
    with pytest.raises(ConfigError, match="unknown storage types"):
        BudgetConfig(target_bytes=10, types=("q3_k",))
    assert BudgetConfig(target_bits=4.0).budget_bytes(1000) == 500


def options(key, pairs):
    opt = TensorOptions(key, (key,), 1, 1)
    for t, (b, c) in pairs.items():
        opt.bytes[t], opt.cost[t] = b, c
    return opt


def test_allocator_finds_the_exact_optimum_where_a_greedy_would_not():
    """One large upgrade worth more than the small ones that would fill the budget first
    (a table whose 2-bit form ruins the model beside linears that each lose a little)."""
    table = {k: options(k, {"q1_0": (10, 1.8), "q2_0": (12, 0.0)}) for k in "ab"}
    table["emb"] = options("emb", {"q2_0": (50, 8.0), "q4_0": (60, 0.0)})
    # greedy by cost saved per byte takes the two 0.9/byte upgrades first (cost 8 left)
    plan = allocate(table, budget_bytes=80)
    assert plan.types == {"a": "q1_0", "b": "q1_0", "emb": "q4_0"}
    assert plan.estimated_cost == pytest.approx(3.6) and plan.total_bytes == 80


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(1, 40), st.floats(0, 10)), min_size=1,
                         max_size=3), min_size=1, max_size=4), st.integers(0, 150))
def test_allocator_equals_exhaustive_search(tables, budget):
    table = {str(i): options(str(i), {f"t{j}": pair for j, pair in enumerate(pairs)})
             for i, pairs in enumerate(tables)}
    feasible = [sum(c for _, c in combo) for combo in itertools.product(*tables)
                if sum(b for b, _ in combo) <= budget]
    if not feasible:
        with pytest.raises(ConfigError, match="below the smallest file"):
            allocate(table, budget)
        return
    plan = allocate(table, budget)  # bytes below DP_BINS: a unit of one byte, exact
    assert plan.total_bytes <= budget
    assert plan.estimated_cost == pytest.approx(min(feasible), abs=1e-9)


def test_allocator_fits_the_budget_and_spends_it_where_the_cost_is():
    table = {k: options(k, {"q2_0": (10, 1.0), "q4_0": (20, 0.1), "q8_0": (40, 0.0)})
             for k in "abcd"}
    table["d"] = options("d", {"q2_0": (10, 1e6), "q4_0": (20, 1e5), "q8_0": (40, 0.0)})
    plan = allocate(table, budget_bytes=80, fixed=5)
    assert plan.total_bytes <= 80
    assert plan.types["d"] == "q8_0"  # the sensitive tensor gets the most bits
    costs = []
    for budget in range(45, 175, 5):
        plan = allocate(table, budget)
        assert plan.total_bytes <= budget
        costs.append(plan.estimated_cost)
    assert all(b <= a for a, b in zip(costs, costs[1:], strict=False))
    with pytest.raises(ConfigError, match="below the smallest file"):
        allocate(table, budget_bytes=39)


def test_options_cover_every_tensor_with_the_types_that_fit(tokenizer, ids):
    model = wide_model(tokenizer)
    types = ("q2_0", "q4_0", "q8_0", DENSE)
    table = measure_options(model, ids, BudgetConfig(target_bytes=1, types=types,
                                                     embedding_types=types), progress=False)
    keys = budget_tensors(model)
    assert set(table) == set(keys)
    assert table[EMBEDDINGS].modules == ("model.embed_tokens", "lm_head")  # tied
    for key, opt in table.items():
        assert set(opt.bytes) == {"q2_0", "q4_0", "q8_0", DENSE}
        assert opt.bytes["q4_0"] == type_bytes("q4_0", opt.out_features, opt.in_features)
        assert opt.cost["q2_0"] > opt.cost["q4_0"] > opt.cost["q8_0"] > opt.cost[DENSE] >= 0
        assert all(math.isfinite(c) for c in opt.cost.values()), key


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_budgeted_file_fits_and_more_bytes_never_measure_worse(kind, tokenizer, ids, tmp_path):
    reference = wide_model(tokenizer, kind)
    metadata = gguf_metadata_bytes(reference, tokenizer)
    smallest = allocate(measure_options(reference, ids, BudgetConfig(target_bytes=1),
                                        progress=False), 10**12, 0)
    sizes = {k: min(o.bytes.values()) for k, o in smallest.options.items()}
    largest = sum(max(o.bytes[t] for t in o.bytes if t != DENSE)
                  for o in smallest.options.values())
    losses = []
    for share in (0.0, 0.3, 0.6, 1.0):
        floor = sum(sizes.values())
        budget = int(metadata + 40_000 + floor + share * (largest - floor))
        model = copy.deepcopy(reference)
        config = CompressConfig(method="gptq", representation=GGUFBlockConfig("q4_0"),
                                budget=BudgetConfig(target_bytes=budget,
                                                    types=("q2_0", "q4_0", "q8_0")))
        report = compress_model(model, ids, config, progress=False, metadata_bytes=metadata)
        written = export_gguf(model, tokenizer, tmp_path / f"{share}.gguf")
        assert written.file_bytes <= budget
        assert report.plan.total_bytes >= written.file_bytes  # the count is an upper bound
        slack = report.plan.total_bytes - written.file_bytes  # at most each record's bound
        assert slack < GGUF_TENSOR_OVERHEAD * len(written.tensor_types)
        for name, layer in quantized_layers(model).items():
            assert layer.qweight.config.block_type == report.plan.layer_types()[name]
        losses.append(kl_to(reference, model, ids))
    assert all(b <= a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.5 * losses[0]


def mixed_model(tokenizer, ids):
    """A tiny model whose linears hold several GGUF block types and one stays dense."""
    model = wide_model(tokenizer)
    table = measure_options(model, ids, BudgetConfig(target_bytes=1), progress=False)
    types = ["q2_0", "q4_0", "q4_1", "q8_0", DENSE]
    chosen = {k: types[i % len(types)] for i, k in enumerate(sorted(table))}
    chosen[EMBEDDINGS] = "q4_0"
    budget = sum(table[k].bytes[t] for k, t in chosen.items())
    for opt in table.values():  # make the allocator land on exactly this choice
        for t in opt.cost:
            opt.cost[t] = 0.0 if t == chosen[opt.key] else 1.0
            if t != chosen[opt.key]:
                opt.bytes[t] = budget + 1
    plan = allocate(table, budget)
    assert plan.types == chosen
    return model, plan


def test_mixed_types_save_export_and_import_bit_exact(tokenizer, ids, tmp_path, monkeypatch):
    model, plan = mixed_model(tokenizer, ids)
    monkeypatch.setattr("pvtune.llm.pipeline.plan_budget", lambda *a, **k: plan)
    compress_model(model, ids, CompressConfig(method="gptq",
                                              representation=GGUFBlockConfig("q4_0"),
                                              budget=BudgetConfig(target_bytes=1)),
                   progress=False)
    kinds = {getattr(m.qweight.config, "block_type", None)
             for m in quantized_layers(model).values()}
    assert kinds == {"q2_0", "q4_0", "q4_1", "q8_0"}
    dense = [n for n, t in plan.types.items() if t == DENSE]
    assert dense and all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in dense)
    save_compressed(model, tokenizer, tmp_path / "ckpt")
    loaded, _ = load_compressed(tmp_path / "ckpt")
    probe = ids[:2]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe).logits, model(input_ids=probe).logits)
    export_gguf(model, tokenizer, tmp_path / "mixed.gguf")
    fresh = wide_model(tokenizer)
    import_gguf_linears(fresh, tmp_path / "mixed.gguf")
    for name, layer in quantized_layers(model).items():
        if name.startswith("model.layers"):
            back = fresh.get_submodule(name).qweight
            assert back.config == layer.qweight.config
            assert torch.equal(back.codes, layer.qweight.codes)
            assert torch.equal(back.scale, layer.qweight.scale)
    for name in dense:
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight)


@pytest.mark.parametrize("strategy", sorted(set(STRATEGIES.names()) - {"proximal_v"}))
def test_every_strategy_trains_through_mixed_types(strategy, tokenizer, ids, monkeypatch):
    # (proximal_v needs row codebooks, which no GGUF type has: tests/optim/test_proximal.py)
    model, plan = mixed_model(tokenizer, ids)
    teacher = copy.deepcopy(model).requires_grad_(False)
    monkeypatch.setattr("pvtune.llm.pipeline.plan_budget", lambda *a, **k: plan)
    compress_model(model, ids, CompressConfig(method="rtn",
                                              representation=GGUFBlockConfig("q4_0"),
                                              budget=BudgetConfig(target_bytes=1)),
                   progress=False)
    cfg = FinetuneConfig(steps=8, batch_size=3, lr=1e-3,
                         vstep=VStepConfig(strategy=strategy, lr=0.1, tau=0.2))
    result = finetune(model, TeacherLogits(teacher, ids), ids, cfg, progress=False)
    assert all(math.isfinite(v) for v in result.losses)
    assert min(result.losses[-3:]) < result.losses[0]
    if strategy != "frozen":
        assert max(result.fraction_changed) > 0


@pytest.mark.parametrize("type_name", ["q2_0", "q4_0", "q4_1", "q8_0"])
def test_rounding_error_is_the_representations_own(type_name):
    from pvtune.llm.budget import rounding_error
    from pvtune.reprs.gguf_block import GGUFBlockWeight

    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    exact = GGUFBlockWeight.from_dense(w, GGUFBlockConfig(type_name))().detach() - w
    torch.testing.assert_close(rounding_error(w, type_name, ratios=16), exact)
    coarse = rounding_error(w, type_name)  # fewer candidate scales: never a better fit
    assert coarse.pow(2).sum() >= exact.pow(2).sum() - 1e-6
