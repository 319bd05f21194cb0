import math

import pytest
import torch

from pvtune.estimators import lsq


def test_lsq_forward_and_gradients_against_formula():
    x = torch.tensor([-5.0, -0.74, 0.26, 1.1, 9.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    qmin, qmax, gs = -4, 3, 0.25
    y = lsq(x, s, qmin, qmax, grad_scale=gs)
    v = x.detach() / 0.5
    assert torch.equal(y.detach(), torch.round(v.clamp(qmin, qmax)) * 0.5)
    g = torch.tensor([1.0, 2.0, -1.0, 0.5, 3.0])
    (y * g).sum().backward()
    inside = (v >= qmin) & (v <= qmax)
    assert torch.equal(x.grad, g * inside.float())
    dstep = torch.where(v < qmin, float(qmin), torch.where(v > qmax, float(qmax), v.round() - v))
    assert math.isclose(float(s.grad), float((g * dstep).sum() * gs), rel_tol=1e-6)


def test_lsq_default_grad_scale_and_per_channel_step():
    x = torch.randn(4, 8)
    s = torch.full((4, 1), 0.3, requires_grad=True)
    lsq(x, s, -2, 1).sum().backward()
    assert s.grad.shape == (4, 1)
    v = x / 0.3
    dstep = torch.where(v < -2, -2.0, torch.where(v > 1, 1.0, v.round() - v))
    torch.testing.assert_close(s.grad, dstep.sum(1, keepdim=True) / math.sqrt(32 * 1))


def test_lsq_bad_range():
    with pytest.raises(ValueError, match="qmin < qmax"):
        lsq(torch.zeros(2), torch.tensor(1.0), 2, 2)
