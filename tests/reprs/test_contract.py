"""The representation contract, checked on every registered representation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call

from pvtune.reprs import (
    AQLMConfig,
    BinaryConfig,
    GGUFBlockConfig,
    GroupedCodebookConfig,
    NMSparseConfig,
    TernaryConfig,
    UniformConfig,
    VQConfig,
    representation_for,
)

CONFIGS = [
    UniformConfig(bits=4, group_size=32),
    UniformConfig(bits=2, group_size=16, symmetric=True),
    UniformConfig(bits=1, group_size=None, scale_search=False),
    BinaryConfig(),
    BinaryConfig(group_size=16),
    TernaryConfig(group_size=32),
    NMSparseConfig(n=2, m=4),
    NMSparseConfig(n=1, m=8),
    VQConfig(num_codewords=16, group_size=4, kmeans_iters=5),
    AQLMConfig(num_codebooks=2, nbits_per_codebook=4, in_group_size=4, kmeans_iters=5),
    AQLMConfig(num_codebooks=1, nbits_per_codebook=5, in_group_size=8, kmeans_iters=5),
    GGUFBlockConfig("q4_1"),
    GGUFBlockConfig("q2_0"),
    GGUFBlockConfig("q8_0"),
    GroupedCodebookConfig(bits=2, groups=4, kmeans_iters=5),
    GroupedCodebookConfig(bits=3, groups=3, grouping="quantiles", kmeans_iters=5),
]
IDS = [f"{c.type_name}-{i}" for i, c in enumerate(CONFIGS)]


def make(config, weight):
    return representation_for(config).from_dense(weight, config)


@pytest.fixture
def weight():
    return torch.randn(24, 64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_forward_shape_and_integer_codes(config, weight):
    rep = make(config, weight)
    w = rep()
    assert w.shape == weight.shape and w.dtype == torch.float32
    assert torch.isfinite(w).all()
    for name, buf in rep.named_buffers():
        if name in rep.integer_codecs():
            assert not buf.is_floating_point()
    assert all(p.is_floating_point() for p in rep.parameters())


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_encode_never_increases_error(config, weight):
    rep = make(config, weight)
    gen = torch.Generator().manual_seed(5)
    for scale in (0.05, 0.5, 2.0):
        target = weight + scale * torch.randn(weight.shape, generator=gen)
        before = rep.group_errors(target)
        rep.encode(target)
        after = rep.group_errors(target)
        assert (after <= before + 1e-6 * (1 + before)).all()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_encode_subset_touches_only_selected_groups(config, weight):
    rep = make(config, weight)
    target = -weight  # far from the current codes: most groups will want to change
    groups = torch.zeros(rep.groups_shape, dtype=torch.bool)
    groups[::3, ::2] = True
    w_before = rep().detach()
    before = rep.group_errors(target)
    rep.encode(target, groups)
    after = rep.group_errors(target)
    changed = (rep().detach() != w_before).view(*rep.groups_shape, -1).any(-1)
    assert not changed[~groups].any()
    assert changed[groups].any()
    assert (after[groups] <= before[groups] + 1e-6).all()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_encode_groups_equals_a_masked_encode(config, weight):
    """Encoding some groups from their values alone gives exactly the codes of a masked
    encode of a full target (the discrete steps rely on it)."""
    target = -weight + 0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(2))
    by_mask, by_index = make(config, weight), make(config, weight)
    n = by_mask.groups_shape[0] * by_mask.groups_shape[1]
    index = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: n // 3].sort().values
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index] = True
    by_mask.encode(target, mask.view(by_mask.groups_shape))
    by_index.encode_groups(index, target.reshape(-1, by_index.code_group_size)[index])
    for name in by_mask.code_buffers:
        assert torch.equal(getattr(by_index, name), getattr(by_mask, name)), name
    assert not torch.equal(by_index(), make(config, weight)())  # some codes did change
    with pytest.raises(ValueError, match="values shape"):
        by_index.encode_groups(index, target.reshape(-1)[: index.numel()])
    bad = target.reshape(-1, by_index.code_group_size)[index].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        by_index.encode_groups(index, bad)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_encode_recovers_own_decoding(config, weight):
    """Encoding the decoded weight is a fixed point (error stays zero)."""
    rep = make(config, weight)
    w = rep().detach()
    rep.encode(w)
    assert torch.allclose(rep(), w, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gradcheck_continuous_path(config, weight):
    rep = make(config, weight).double()
    names = [n for n, _ in rep.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in rep.named_parameters())
    buffers = dict(rep.named_buffers())

    def decode(*ps):
        return functional_call(rep, ({**dict(zip(names, ps, strict=True)), **buffers},), ())

    assert torch.autograd.gradcheck(decode, params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_decode_groups_equals_the_full_decoding(config, weight):
    """Bit-equal to the same groups of ``forward()``: the discrete step compares them."""
    rep = make(config, weight)
    with torch.no_grad():
        full = rep().reshape(-1, rep.code_group_size)
    n = full.shape[0]
    index = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n // 3]
    assert torch.equal(rep.decode_groups(index), full[index])
    assert rep.decode_groups(index[:0]).shape == (0, rep.code_group_size)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_bad_groups_mask_rejected(config, weight):
    rep = make(config, weight)
    with pytest.raises(ValueError, match="bool mask of shape"):
        rep.encode(weight, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="target shape"):
        rep.encode(weight[:, :8])


@given(
    out=st.integers(1, 6),
    ngroups=st.integers(1, 4),
    group=st.sampled_from([1, 2, 8]),
    bits=st.integers(1, 8),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_uniform_any_shape(out, ngroups, group, bits, symmetric, seed):
    if symmetric and bits < 2:
        return
    w = torch.randn(out, ngroups * group, generator=torch.Generator().manual_seed(seed))
    rep = make(UniformConfig(bits=bits, group_size=group, symmetric=symmetric), w)
    levels = rep.codes.unique()
    assert int(levels.max()) < 2**bits
    meta = 16 if symmetric else 16 + bits
    assert rep.bits_per_param() == bits + meta / group
    # reconstruction is never worse than mapping every weight to zero... unless exactly zero
    assert rep.group_errors(w).sum() <= w.pow(2).sum() + 1e-5


@given(
    out=st.integers(1, 5),
    ngroups=st.integers(1, 5),
    m=st.integers(2, 8),
    data=st.data(),
)
def test_nm_sparse_any_shape(out, ngroups, m, data):
    n = data.draw(st.integers(1, m - 1))
    w = torch.randn(out, ngroups * m, generator=torch.Generator().manual_seed(out * 31 + m))
    rep = make(NMSparseConfig(n=n, m=m), w)
    assert rep.values.shape == (out, ngroups, n) and rep.pattern.shape == (out, ngroups)
    dense = rep().view(out, ngroups, m)
    assert ((dense != 0).sum(-1) == n).all()
    # the kept entries are the n largest magnitudes, at their own values (fp16-rounded)
    top = w.abs().view(out, ngroups, m).topk(n, -1).indices
    kept = torch.zeros(out, ngroups, m, dtype=torch.bool).scatter_(-1, top, True)
    assert torch.equal(dense != 0, kept)
    expected = torch.where(kept, w.view(out, ngroups, m).half().float(), torch.zeros(()))
    assert torch.equal(dense, expected)


@given(
    out=st.integers(2, 8),
    ngroups=st.integers(2, 8),
    g=st.sampled_from([1, 2, 4]),
    m=st.integers(1, 3),
    b=st.integers(1, 3),
)
def test_aqlm_any_shape(out, ngroups, g, m, b):
    if (1 << b) > out * ngroups:
        return
    w = torch.randn(out, ngroups * g, generator=torch.Generator().manual_seed(out + 7 * g))
    cfg = AQLMConfig(num_codebooks=m, nbits_per_codebook=b, in_group_size=g, kmeans_iters=3)
    rep = make(cfg, w)
    assert rep.codes.shape == (out, ngroups, m)
    assert int(rep.codes.max()) < (1 << b)
    assert rep.codebooks.shape == (m, 1 << b, 1, g)
    assert rep.scales.shape == (out, 1, 1, 1)


def test_uniform_noise_draws_on_the_cpu_generator_in_the_target_dtype():
    from pvtune.reprs.base import uniform_noise

    like = torch.zeros(3, 4, dtype=torch.float64)
    a = uniform_noise(like, torch.Generator().manual_seed(7))
    b = torch.rand(3, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert a.dtype == like.dtype and a.device == like.device
    assert torch.equal(a, b)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_encode_refuses_a_zero_beam_and_non_finite_targets(config, weight):
    rep = make(config, weight)
    codes = {n: b.clone() for n, b in rep.named_buffers()}
    with pytest.raises(ValueError, match="beam_size must be a positive int"):
        rep.encode(weight, beam_size=0)
    bad = weight.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="1 non-finite value"):
        rep.encode(bad)
    assert all(torch.equal(b, codes[n]) for n, b in rep.named_buffers())


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_step_unit_scales_with_the_weights(config, weight):
    """The unit discrete steps are measured in scales exactly with the weights (a power of
    two keeps the arithmetic exact), so step sizes transfer between models."""
    from pvtune.reprs.base import times_unit

    unit = make(config, weight).step_unit()
    small = make(config, weight / 8).step_unit()
    assert unit.dim() == 2 and weight.shape[1] % unit.shape[1] == 0
    assert torch.equal(small * 8, unit) and bool((unit > 0).all())
    ones = torch.ones_like(weight)
    assert times_unit(ones, unit).shape == weight.shape


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_continuous_params_are_fp16_exact_after_init(config, weight):
    for name, p in make(config, weight).named_parameters():
        assert torch.equal(p.detach().half().float(), p.detach()), name


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_a_snapshot_of_some_groups_restores_exactly_those(config, weight):
    """snapshot_groups/restore_groups (what the subspace strategies save and put back)
    agree with the whole-buffer snapshot_codes/restore_codes."""
    rep = make(config, weight)
    groups = rep.groups_shape[0] * rep.groups_shape[1]
    index = torch.randperm(groups, generator=torch.Generator().manual_seed(0))[: groups // 3]
    mask = torch.zeros(groups, dtype=torch.bool)
    mask[index] = True
    mask = mask.view(rep.groups_shape)
    before = rep.snapshot_codes()
    saved = rep.snapshot_groups(index)
    rep.encode(-2.0 * weight, mask)  # those groups take other codes
    assert any(not torch.equal(getattr(rep, k), v) for k, v in before.items())
    rep.restore_groups(index, saved)
    assert all(torch.equal(getattr(rep, k), v) for k, v in before.items())
    # restoring a subset of them: the others keep their new codes, as restore_codes does
    rep.encode(-2.0 * weight, mask)
    want = rep.snapshot_codes()
    half = index[: index.numel() // 2]
    keep = mask.clone().view(-1)
    keep[half] = False
    rep.restore_codes(before, keep=keep.view(rep.groups_shape))
    expected = rep.snapshot_codes()
    for k, v in want.items():
        getattr(rep, k).copy_(v)
    rep.restore_groups(half, {k: v[: half.numel()] for k, v in saved.items()})
    assert all(torch.equal(getattr(rep, k), v) for k, v in expected.items())


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_targets_inside_the_change_threshold_keep_their_codes(config, weight):
    """A representation's change threshold is a promise: targets nearer the decoded weights
    than it (entry by entry) re-encode to the same codes, so a discrete step may skip those
    groups; targets just past half a grid step away do move (scalar grids)."""
    from pvtune.reprs.base import times_unit

    rep = make(config, weight)
    limit = rep.change_threshold()
    if limit is None:
        pytest.skip("no threshold: every group may change")
    assert limit.shape == rep.step_unit().shape and bool((limit > 0).all())
    w = rep().detach()
    before = rep.snapshot_codes()
    gen = torch.Generator().manual_seed(1)
    for fraction in (0.999, -0.999):  # right at the edge, both ways
        noise = torch.rand(w.shape, generator=gen) * fraction
        rep.encode(w + times_unit(noise, limit))
        assert all(torch.equal(getattr(rep, k), v) for k, v in before.items())
    # half a step and a bit more, towards the grid's middle, moves every code
    middle = 0.5 * (w.amax(-1, keepdim=True) + w.amin(-1, keepdim=True))
    toward = torch.where(w < middle, 1.0, -1.0)
    rep.encode(w + times_unit(toward * 1.02, 2 * limit / (1 - 1e-3)))
    moved = rep.snapshot_codes()
    share = sum(float((moved[k] != v).float().mean()) for k, v in before.items()) / len(before)
    assert share > 0.9
