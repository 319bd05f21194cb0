import pytest
import torch

from pvtune.estimators import nm_mask, sr_ste


def test_nm_mask_keeps_largest():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, -1.5, 0.2, 0.0]])
    mask = nm_mask(w, 2, 4)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]


def test_sr_ste_forward_and_backward_formula():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    y = sr_ste(w, 2, 4, decay=0.1)
    assert torch.equal(y.detach(), torch.tensor([[0.0, -3.0, 2.0, 0.0]]))
    (y * g).sum().backward()
    expected = g + 0.1 * torch.tensor([[1.0, 0, 0, 1]]) * w.detach()
    torch.testing.assert_close(w.grad, expected)


@pytest.mark.parametrize(("n", "m"), [(0, 4), (4, 4), (5, 4)])
def test_bad_nm(n, m):
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(torch.zeros(1, 8), n, m)
