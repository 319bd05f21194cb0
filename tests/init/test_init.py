"""Layer-wise initialisers against the objective they minimise."""

from __future__ import annotations

import pytest
import torch

from pvtune.init import (
    AQLMInitConfig,
    GPTQConfig,
    JLCMInitConfig,
    RTNConfig,
    aqlm_init,
    gptq_init,
    jlcm_init,
    rtn_init,
)
from pvtune.init.aqlm import output_error, residual_kmeans_init, sweep_codes, update_codebooks
from pvtune.init.gptq import inverse_hessian_cholesky
from pvtune.init.jlcm import refit_levels
from pvtune.reprs import AQLMConfig, GroupedCodebookConfig, UniformConfig


def correlated_problem(out=48, inp=64, tokens=2048, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=gen) * torch.linspace(0.05, 2.0, inp)
    x = torch.randn(tokens, inp, generator=gen) @ mix
    w = torch.randn(out, inp, generator=gen) * 0.1
    return w, x.T @ x / tokens


def rel_out_err(rep, w, h):
    dw = rep().detach() - w
    return float(((dw @ h) * dw).sum() / ((w @ h) * w).sum())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    w, h = correlated_problem()
    cfg = UniformConfig(bits=bits, group_size=16)
    rtn = rel_out_err(rtn_init(w, h, cfg, RTNConfig()), w, h)
    gptq = rel_out_err(gptq_init(w, h, cfg, GPTQConfig(act_order=act_order)), w, h)
    assert gptq < 0.9 * rtn


def test_gptq_codes_and_grid_are_consistent():
    w, h = correlated_problem()
    rep = gptq_init(w, h, UniformConfig(bits=3, group_size=16), GPTQConfig())
    assert int(rep.codes.max()) <= 7
    assert torch.equal(rep.scale.half().float(), rep.scale)  # fp16-exact grid


def test_gptq_with_identity_hessian_is_rtn():
    w, _ = correlated_problem()
    cfg = UniformConfig(bits=3, group_size=16)
    a = gptq_init(w, torch.eye(64), cfg, GPTQConfig(damp=0.0))
    b = rtn_init(w, None, cfg, RTNConfig())
    torch.testing.assert_close(a(), b())


def test_inverse_hessian_cholesky():
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(0))
    h = x.T @ x / 512
    u = inverse_hessian_cholesky(h, 0.0)
    torch.testing.assert_close(u.T @ u @ h, torch.eye(16), rtol=0, atol=1e-4)
    assert torch.equal(u, torch.triu(u))


def test_gptq_needs_xtx():
    with pytest.raises(ValueError, match="needs the layer's input statistics"):
        gptq_init(torch.randn(4, 16), None, UniformConfig(group_size=16), GPTQConfig())


AQ = AQLMConfig(num_codebooks=2, nbits_per_codebook=5, in_group_size=4, kmeans_iters=5)


def test_aqlm_sweep_never_increases_objective():
    w, h = correlated_problem()
    rep = residual_kmeans_init(w, AQ, AQLMInitConfig())
    before = output_error(rep, w, h)
    sweep_codes(rep, w, h, beam_size=2)
    mid = output_error(rep, w, h)
    sweep_codes(rep, w, h, beam_size=2)
    assert mid < before and output_error(rep, w, h) <= mid + 1e-7


def test_aqlm_codebook_update_lowers_objective():
    w, h = correlated_problem()
    rep = residual_kmeans_init(w, AQ, AQLMInitConfig())
    before = output_error(rep, w, h)
    update_codebooks(rep, w, h, steps=30, lr=1e-2)
    assert output_error(rep, w, h) < before


def test_aqlm_init_beats_calibration_free_kmeans():
    w, h = correlated_problem()
    from pvtune.reprs import representation_for

    plain = representation_for(AQ).from_dense(w, AQ)
    tuned = aqlm_init(w, h, AQ, AQLMInitConfig(max_rounds=3))
    assert output_error(tuned, w, h) < 0.8 * output_error(plain, w, h)


def test_aqlm_sweep_objective_matches_bruteforce_on_one_group():
    """The whitened search finds the exact best codes for one group given the others."""
    import itertools

    w, h = correlated_problem(out=3, inp=8)
    cfg = AQLMConfig(num_codebooks=2, nbits_per_codebook=2, in_group_size=4, kmeans_iters=2)
    rep = residual_kmeans_init(w, cfg, AQLMInitConfig())
    sweep_codes(rep, w, h, beam_size=4)  # full beam over 4 codewords: exhaustive
    best = output_error(rep, w, h)
    codes = rep.codes.clone()
    for row, j in itertools.product(range(3), range(2)):
        for combo in itertools.product(range(4), range(4)):
            rep.codes.copy_(codes)
            rep.codes[row, j] = torch.tensor(combo, dtype=codes.dtype)
            assert output_error(rep, w, h) >= best - 1e-6


@pytest.mark.parametrize("bits", [2, 3])
def test_jlcm_error_feedback_lowers_the_output_error_with_the_same_levels(bits):
    w, h = correlated_problem()
    cfg = GroupedCodebookConfig(bits=bits, groups=4)
    nearest = jlcm_init(w, h, cfg, JLCMInitConfig(error_feedback=False))
    feedback = jlcm_init(w, h, cfg, JLCMInitConfig(refit_rounds=0))
    assert torch.equal(nearest.codebooks, feedback.codebooks)
    assert torch.equal(nearest.row_group, feedback.row_group)
    assert rel_out_err(feedback, w, h) < 0.9 * rel_out_err(nearest, w, h)
    # every code is one of its row's levels: decode through the representation agrees
    levels = feedback.row_levels()
    torch.testing.assert_close(feedback(), levels.gather(1, feedback.codes.long()))
    # refitting the levels to the codes lowers the error further
    refitted = jlcm_init(w, h, cfg, JLCMInitConfig(refit_rounds=1))
    assert rel_out_err(refitted, w, h) < rel_out_err(feedback, w, h)


def test_jlcm_error_feedback_with_identity_hessian_is_nearest_rounding():
    w, _ = correlated_problem()
    cfg = GroupedCodebookConfig(bits=2, groups=3)
    a = jlcm_init(w, torch.eye(64), cfg, JLCMInitConfig(damp=0.0, refit_rounds=0))
    b = jlcm_init(w, torch.eye(64), cfg, JLCMInitConfig(error_feedback=False))
    assert torch.equal(a.codes, b.codes)


def test_jlcm_level_refit_solves_the_least_squares_problem_of_its_codes():
    w, h = correlated_problem(out=6, inp=16, seed=3)
    rep = jlcm_init(w, h, GroupedCodebookConfig(bits=2, groups=2),
                    JLCMInitConfig(refit_rounds=0))
    before = rel_out_err(rep, w, h)
    codes = rep.codes.clone()
    refit_levels(rep, w, h)
    assert torch.equal(rep.codes, codes) and rel_out_err(rep, w, h) <= before
    # the same levels from a dense least-squares solve: sum_r ||(w_r - A_r L_g) H^1/2||^2
    root = torch.linalg.cholesky(h.double() + 1e-9 * torch.eye(16, dtype=torch.float64))
    for g in range(2):
        rows = (rep.row_group == g).nonzero().squeeze(1)
        onehot = torch.nn.functional.one_hot(codes[rows].long(), 4).double()
        design = torch.einsum("ij,rik->rjk", root, onehot).reshape(-1, 4)
        target = (w[rows].double() @ root).reshape(-1)
        used = onehot.sum((0, 1)) > 0
        solution = torch.linalg.lstsq(design[:, used], target[:, None]).solution.squeeze(1)
        torch.testing.assert_close(rep.codebooks[g, used].double(), solution,
                                   rtol=2e-3, atol=1e-4)  # float16 levels
