from __future__ import annotations

import pytest
import torch

from pvtune.kernels.nearest import nearest_codewords, nearest_kernel_available
from pvtune.reprs.codebook_search import beam_search, nearest

pytestmark = pytest.mark.skipif(
    not nearest_kernel_available(torch.zeros(1, 1), torch.zeros(1, 1)), reason="needs numba")


@pytest.mark.parametrize(("n", "k", "d"), [(1, 2, 1), (63, 17, 5), (1000, 256, 8), (129, 4, 3)])
def test_kernel_matches_the_matrix_product_argmin(n, k, d):
    gen = torch.Generator().manual_seed(n + k)
    x, book = torch.randn(n, d, generator=gen), torch.randn(k, d, generator=gen)
    idx, part = nearest_codewords(x, book)
    ref = torch.cdist(x.double(), book.double()).pow(2) - x.double().pow(2).sum(-1, keepdim=True)
    best = ref.min(-1).values
    # the chosen codeword is the nearest up to float32 rounding of the distances
    chosen = ref.gather(1, idx.unsqueeze(1)).squeeze(1)
    assert (chosen - best).abs().max() < 1e-4
    # and exactly it where the runner-up is not within rounding
    second = ref.topk(min(2, k), -1, largest=False).values[:, -1]
    clear = (second - best) > 1e-3
    assert torch.equal(idx[clear], ref.argmin(-1)[clear])
    torch.testing.assert_close(part.double(), chosen, atol=1e-4, rtol=1e-5)


def test_ties_go_to_the_first_codeword_as_argmin():
    book = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])  # the last is equidistant to all
    idx, _ = nearest_codewords(x, book)
    assert idx.tolist() == [0, 1, 0]


def test_empty_input_and_the_torch_fallback_agree():
    idx, dist = nearest_codewords(torch.zeros(0, 4), torch.randn(3, 4))
    assert idx.shape == (0,) and dist.shape == (0,)
    gen = torch.Generator().manual_seed(3)
    x, book = torch.randn(500, 8, generator=gen), torch.randn(64, 8, generator=gen)
    fast = nearest(x, book)  # float32 on the CPU: the kernel
    slow = nearest(x.double(), book.double())  # float64: chunked matrix products
    assert torch.equal(fast[0], slow[0])
    torch.testing.assert_close(fast[1].double(), slow[1], atol=1e-4, rtol=1e-5)


def test_greedy_search_is_the_same_with_and_without_the_kernel():
    gen = torch.Generator().manual_seed(4)
    books, t = torch.randn(2, 256, 8, generator=gen), torch.randn(3000, 8, generator=gen)
    assert torch.equal(beam_search(t, books, 1), beam_search(t.double(), books.double(), 1))
