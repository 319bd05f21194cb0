from __future__ import annotations

import itertools

import torch
from hypothesis import given
from hypothesis import strategies as st

from pvtune.reprs import AQLMConfig, representation_for
from pvtune.reprs.codebook_search import (
    _beam_chunk,
    _greedy_chunk,
    additive_decode,
    beam_search,
    kmeans,
    nearest,
    refine_codes,
)


def _err(t, books, codes):
    return (additive_decode(books, codes) - t).pow(2).sum(-1)


def test_additive_decode_is_the_sum_of_codewords_with_codebook_gradients():
    gen = torch.Generator().manual_seed(0)
    books = torch.randn(3, 16, 4, generator=gen, requires_grad=True)
    codes = torch.randint(0, 16, (5, 7, 3), generator=gen, dtype=torch.int64)
    out = additive_decode(books, codes.to(torch.uint8))
    ref = sum(books[m][codes[..., m]] for m in range(3))
    assert out.shape == (5, 7, 4)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), books)
    (grad_ref,) = torch.autograd.grad(ref.pow(2).sum(), books)
    torch.testing.assert_close(grad, grad_ref)


def test_nearest_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    x, book = torch.randn(300, 5, generator=gen), torch.randn(17, 5, generator=gen)
    idx, dist = nearest(x, book)
    brute = torch.cdist(x, book).pow(2)
    assert torch.equal(idx, brute.argmin(-1))
    torch.testing.assert_close(dist, brute.min(-1).values, atol=1e-4, rtol=1e-4)


def test_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[10.0, 0], [0, 10], [-10, 0], [0, -10]])
    x = (centers.repeat(50, 1) + 0.1 * torch.randn(200, 2, generator=gen))
    found = kmeans(x, 4, iters=10, generator=gen)
    d = torch.cdist(found, centers)
    assert (d.min(0).values < 0.1).all()


def test_kmeans_deterministic():
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(1))
    a = kmeans(x, 8, generator=torch.Generator().manual_seed(3))
    b = kmeans(x, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@given(seed=st.integers(0, 10_000), beam=st.integers(2, 8), m=st.integers(2, 3))
def test_beam_never_worse_than_greedy(seed, beam, m):
    gen = torch.Generator().manual_seed(seed)
    books = torch.randn(m, 8, 3, generator=gen)
    t = torch.randn(64, 3, generator=gen)
    greedy = _err(t, books, beam_search(t, books, 1))
    wide = _err(t, books, beam_search(t, books, beam))
    assert (wide <= greedy + 1e-5).all()


@given(seed=st.integers(0, 10_000), m=st.integers(1, 3))
def test_greedy_path_equals_the_beam_path_of_width_one(seed, m):
    """``beam_size=1`` takes a shorter path (one matrix product per codebook); it must pick
    the same codes as the general beam search of width one."""
    gen = torch.Generator().manual_seed(seed)
    books = torch.randn(m, 16, 4, generator=gen)
    t = torch.randn(200, 4, generator=gen)
    cnorm = books.pow(2).sum(-1)
    assert torch.equal(_greedy_chunk(t, books, cnorm, 1), _beam_chunk(t, books, cnorm, 1))


def test_full_beam_is_exhaustive_optimum():
    gen = torch.Generator().manual_seed(0)
    books = torch.randn(2, 6, 4, generator=gen)
    t = torch.randn(50, 4, generator=gen)
    all_codes = torch.tensor(list(itertools.product(range(6), range(6))))
    best = torch.stack([_err(t, books, c.expand(50, 2)) for c in all_codes]).min(0).values
    torch.testing.assert_close(_err(t, books, beam_search(t, books, 6)), best)


def test_beam_search_improves_on_average():
    gen = torch.Generator().manual_seed(0)
    books = torch.randn(3, 16, 4, generator=gen)
    t = torch.randn(400, 4, generator=gen)
    assert _err(t, books, beam_search(t, books, 8)).mean() < \
        _err(t, books, beam_search(t, books, 1)).mean()


def test_refine_never_increases():
    gen = torch.Generator().manual_seed(0)
    books = torch.randn(3, 16, 4, generator=gen)
    t = torch.randn(200, 4, generator=gen)
    codes = torch.randint(16, (200, 3), generator=gen)
    assert (_err(t, books, refine_codes(t, books, codes)) <= _err(t, books, codes) + 1e-6).all()


def test_aqlm_encode_with_wider_beam_not_worse():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    cfg = AQLMConfig(num_codebooks=3, nbits_per_codebook=5, in_group_size=4, kmeans_iters=4)
    rep = representation_for(cfg).from_dense(w, cfg)
    target = w + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    a = representation_for(cfg).from_dense(w, cfg)
    a.load_state_dict(rep.state_dict())
    a.encode(target, beam_size=1)
    rep.encode(target, beam_size=8)
    assert rep.group_errors(target).sum() <= a.group_errors(target).sum()
