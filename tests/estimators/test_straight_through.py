"""Each estimator's backward against its formula at chosen points."""

import math

import pytest
import torch

from pvtune.estimators import (
    approx_sign,
    binary_sign,
    clipped_ste,
    get_estimator,
    list_estimators,
    register_estimator,
    reste,
    reste_indicators,
    reste_schedule,
    ste,
)

X = torch.tensor([-2.0, -1.2, -1.0, -0.6, -0.05, 0.0, 0.05, 0.3, 0.99, 1.4, 1.6, 3.0])


def _grad(fn, x, g=None):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    g = torch.linspace(0.5, 1.5, x.numel()) if g is None else g
    (y * g).sum().backward()
    return y.detach(), x.grad, g


def test_binary_sign_never_zero():
    assert torch.equal(binary_sign(torch.tensor([-1.0, 0.0, 2.0])), torch.tensor([-1.0, 1, 1]))


def test_ste_round_forward_and_identity_backward():
    y, grad, g = _grad(ste, X)
    assert torch.equal(y, torch.round(X))
    assert torch.equal(grad, g)


def test_ste_custom_quantizer():
    y, grad, g = _grad(lambda x: ste(x, binary_sign), X)
    assert torch.equal(y, binary_sign(X))
    assert torch.equal(grad, g)


@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_clipped_ste(clip):
    y, grad, g = _grad(lambda x: clipped_ste(x, clip=clip), X)
    assert torch.equal(y, binary_sign(X))
    assert torch.equal(grad, g * (X.abs() <= clip).float())


def test_approx_sign():
    _, grad, g = _grad(approx_sign, X)
    expected = torch.where(X.abs() <= 1, 2 * (1 - X.abs()), torch.zeros_like(X))
    torch.testing.assert_close(grad, g * expected)
    # spot values: x = 0.3 -> 1.4, x = -0.6 -> 0.8
    assert math.isclose(float(grad[7] / g[7]), 1.4, rel_tol=1e-6)
    assert math.isclose(float(grad[3] / g[3]), 0.8, rel_tol=1e-6)


@pytest.mark.parametrize("o", [1.0, 2.0, 3.0])
def test_reste_backward_formula(o):
    y, grad, g = _grad(lambda x: reste(x, o=o), X)
    assert torch.equal(y, binary_sign(X))
    for xi, gi, gradi in zip(X.tolist(), g.tolist(), grad.tolist(), strict=True):
        a = abs(xi)
        if a > 1.5:
            slope = 0.0
        elif a <= 0.1:
            slope = 0.1 ** (1 / o) / 0.1
        else:
            slope = (1 / o) * a ** ((1 - o) / o)
        assert math.isclose(gradi, gi * slope, rel_tol=1e-5, abs_tol=1e-7), (xi, o)


def test_reste_at_o1_is_clipped_identity():
    _, grad, g = _grad(lambda x: reste(x, o=1.0), X)
    assert torch.allclose(grad, g * (X.abs() <= 1.5).float())


def test_reste_schedule_endpoints_and_monotone():
    assert reste_schedule(0, 10) == 1.0
    assert math.isclose(reste_schedule(10, 10), 3.0)
    values = [reste_schedule(e, 10) for e in range(11)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert math.isclose(reste_schedule(5, 10, o_end=3), 1 + 2 * (1 - math.cos(math.pi / 4)))


def test_reste_indicators():
    w = [torch.tensor([0.25, -4.0])]
    g = [torch.tensor([1.0, -3.0])]
    out = reste_indicators(w, g, o=2.0)
    assert math.isclose(out["estimating_error"], math.hypot(0.5 - 1, -2 + 1), rel_tol=1e-6)
    assert math.isclose(out["gradient_stability"], float(torch.tensor([1.0, 3.0]).var()))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="o must be >= 1"):
        reste(X, o=0.5)
    with pytest.raises(ValueError, match="clip must be > 0"):
        clipped_ste(X, clip=0)


def test_registry_has_all_and_is_extensible():
    expected = {"ste", "clipped_ste", "approx_sign", "reste", "stochastic_rounding", "lsq",
                "sr_ste", "gumbel_softmax_st"}
    assert expected <= set(list_estimators())
    assert get_estimator("approx_sign") is approx_sign

    @register_estimator("test_double", overwrite=True)
    def double(x):
        return 2 * x

    assert get_estimator("test_double")(torch.tensor(2.0)) == 4
    with pytest.raises(KeyError, match="known:"):
        get_estimator("no_such_estimator")
