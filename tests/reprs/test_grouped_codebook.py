"""Grouped scalar codebooks (JLCM): rows of clearly different distributions land in different
groups under both groupings; the stored bytes are the bits it reports; levels follow the
importance they are fitted with; save/load is bit-exact."""

from __future__ import annotations

import pytest
import torch

from pvtune.checkpoint.format import load_quantized, pack_state, save_quantized, storage_report
from pvtune.errors import ConfigError
from pvtune.nn import QuantizedLinear, quantize_
from pvtune.reprs import GroupedCodebookConfig, GroupedCodebookWeight
from pvtune.reprs.grouped_codebook import group_rows, weighted_levels


def two_kinds(n: int = 16, width: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows alternating between a narrow Gaussian and a wide, shifted Laplace-like law."""
    gen = torch.Generator().manual_seed(0)
    narrow = 0.02 * torch.randn(n, width, generator=gen)
    wide = 0.5 + torch.distributions.Laplace(0.0, 0.3).sample((n, width))
    rows = torch.empty(2 * n, width)
    rows[0::2], rows[1::2] = narrow, wide
    kind = torch.arange(2 * n) % 2
    return rows, kind


@pytest.mark.parametrize("grouping", ["moments", "quantiles"])
def test_rows_of_two_distributions_fall_into_different_groups(grouping):
    rows, kind = two_kinds()
    labels = group_rows(rows, 2, grouping, iters=20, seed=0)
    same = labels[kind == 0]
    other = labels[kind == 1]
    assert len(set(same.tolist())) == 1 and len(set(other.tolist())) == 1
    assert same[0] != other[0]


def test_each_group_gets_its_own_levels_and_the_error_is_small():
    rows, kind = two_kinds()
    rep = GroupedCodebookWeight.from_dense(rows, GroupedCodebookConfig(bits=3, groups=2))
    narrow_group = int(rep.row_group[0])
    levels = rep.codebooks[narrow_group]
    assert levels.abs().max() < 0.1  # the narrow rows' codebook spans their range only
    err_grouped = (rep() - rows)[kind == 0].pow(2).mean()
    one = GroupedCodebookWeight.from_dense(rows, GroupedCodebookConfig(bits=3, groups=1))
    assert err_grouped < 0.2 * (one() - rows)[kind == 0].pow(2).mean()


def test_importance_pulls_the_levels_toward_the_weights_that_matter():
    values = torch.cat([torch.zeros(100), torch.ones(100)]) + torch.linspace(0, 0.01, 200)
    even = weighted_levels(values, torch.ones(200), 1, 10)
    heavy = weighted_levels(values, torch.cat([torch.ones(100), 100 * torch.ones(100)]), 1, 10)
    assert abs(float(even[0]) - 0.5) < 0.02 and float(heavy[0]) > 0.95


def test_the_stored_bytes_are_the_bits_it_reports(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 40))
    config = GroupedCodebookConfig(bits=2, groups=5)
    quantize_(model, config)
    state, _ = pack_state(model)
    report = storage_report(model, state)
    for name, layer in model.named_children():
        entry = report["layers"][name]
        assert entry["bits_per_param"] == pytest.approx(layer.qweight.bits_per_param())
    # 2 bits of codes, 5 x 4 float16 levels, 3 bits of group per row
    assert model[0].qweight.bits_per_param() == 2 + (16 * 5 * 4 + 48 * 3) / (48 * 64)
    x = torch.randn(3, 64)
    expected = model(x)
    save_quantized(model, tmp_path)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 40))
    load_quantized(fresh, tmp_path)
    assert isinstance(fresh[0], QuantizedLinear)
    assert torch.equal(fresh(x), expected)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="groups"):
        GroupedCodebookWeight(3, 8, GroupedCodebookConfig(groups=4))
    with pytest.raises(KeyError, match="row grouping"):
        GroupedCodebookConfig(grouping="astrology")
    with pytest.raises(ConfigError, match="bits"):
        GroupedCodebookConfig(bits=9)


def test_the_change_threshold_is_half_the_closest_pair_of_levels():
    rep = GroupedCodebookWeight(2, 3, GroupedCodebookConfig(bits=2, groups=2))
    with torch.no_grad():
        rep.codebooks.copy_(torch.tensor([[0.0, 1.0, 1.5, 3.0], [-2.0, 0.0, 2.0, 4.0]]))
        rep.row_group.copy_(torch.tensor([0, 1], dtype=torch.uint8))
        rep.codes.copy_(torch.tensor([[1, 0, 3], [1, 1, 1]], dtype=torch.uint8))
    limit = rep.change_threshold()
    assert limit.squeeze(1).tolist() == pytest.approx([0.25 * (1 - 1e-3), 1.0 * (1 - 1e-3)])
    # tight at the closest pair: just past it, the weight at 1.0 moves to 1.5
    rep.encode(torch.tensor([[1.2501, 0.0, 3.0], [0.0, 0.0, 0.0]]))
    assert rep().tolist()[0] == [1.5, 0.0, 3.0]
    # conservative elsewhere: the weight at 3.0 keeps its code this far away too
    rep.encode(torch.tensor([[1.5, 0.0, 3.0 - 0.2499], [0.999, -0.999, 0.0]]))
    assert rep().tolist() == [[1.5, 0.0, 3.0], [0.0, 0.0, 0.0]]
