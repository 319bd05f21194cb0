import torch

from pvtune.estimators import gumbel_softmax_st, sample_gumbel, stochastic_rounding


def test_stochastic_rounding_neighbours_unbiased_identity_grad():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 0.3, requires_grad=True)
    y = stochastic_rounding(x, generator=gen)
    assert set(y.unique().tolist()) == {0.0, 1.0}
    assert abs(float(y.detach().mean()) - 0.3) < 0.005
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_stochastic_rounding_integers_fixed():
    x = torch.tensor([-2.0, 0.0, 5.0])
    assert torch.equal(stochastic_rounding(x), x)


def test_gumbel_st_forward_is_one_hot_of_perturbed_argmax():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    noise = torch.tensor([[0.0, -5.0, 0.0], [0.1, 0.2, 0.3]])
    y = gumbel_softmax_st(logits, gumbel=noise)
    assert torch.equal(y, torch.tensor([[1.0, 0, 0], [0, 0, 1]]))


def test_gumbel_st_backward_equals_softmax_jacobian():
    logits = torch.tensor([[0.2, -0.4, 1.1, 0.0]], requires_grad=True)
    noise = torch.tensor([[0.3, 0.1, -0.2, 0.5]])
    tau = 0.7
    g = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    (gumbel_softmax_st(logits, tau=tau, gumbel=noise) * g).sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    (torch.softmax((ref + noise) / tau, -1) * g).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_gumbel_samples_follow_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3])).expand(20000, 3)
    y = gumbel_softmax_st(logits, generator=gen)
    torch.testing.assert_close(y.mean(0), torch.tensor([0.2, 0.5, 0.3]), atol=0.015, rtol=0)


def test_sample_gumbel_finite():
    g = sample_gumbel(torch.Size([1000]), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all()
