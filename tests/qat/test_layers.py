"""QAT layers: the forward is the hard projection of the latent weights, the backward is the
named estimator's formula, and freeze_ keeps the outputs bit for bit (also after a save)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pvtune import load_quantized, save_quantized
from pvtune.errors import ConfigError
from pvtune.nn import QuantizedConv2d, QuantizedLinear, quantize_
from pvtune.qat import (
    ActivationQuantConfig,
    EstimatorConfig,
    QATConfig,
    QATConv2d,
    QATLinear,
    QATSchedule,
    freeze_,
)
from pvtune.reprs import BinaryConfig, NMSparseConfig, TernaryConfig, UniformConfig
from pvtune.reprs.base import round_to_fp16

CASES = [
    (BinaryConfig(), "ste"), (BinaryConfig(group_size=8), "clipped_ste"),
    (BinaryConfig(), "approx_sign"), (BinaryConfig(), "reste"),
    (TernaryConfig(), "ste"), (TernaryConfig(group_size=8), "lsq"),
    (TernaryConfig(), "stochastic_rounding"), (TernaryConfig(), "clipped_ste"),
    (UniformConfig(bits=2, group_size=8), "ste"),
    (UniformConfig(bits=3, group_size=None, symmetric=True), "lsq"),
    (UniformConfig(bits=4, group_size=8), "stochastic_rounding"),
    (NMSparseConfig(2, 4), "ste"), (NMSparseConfig(2, 4), "sr_ste"),
]


class Net(nn.Module):
    """conv (in 8 x 3 x 3 = 72 per output) -> relu -> linear -> relu -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


@pytest.mark.parametrize(("rep", "est"), CASES)
def test_freeze_keeps_outputs_bit_exact_and_reloads(rep, est, tmp_path):
    net = make_net()
    acts = ActivationQuantConfig(bits=4, signed=False, estimator="lsq")
    quantize_(net, QATConfig(rep, estimator=est, activations=acts),
              filter_fn=lambda m, n: n != "fc2")
    assert isinstance(net.conv, QATConv2d) and isinstance(net.fc1, QATLinear)
    x = torch.randn(5, 8, 4, 4)
    net.train()
    net(x).sum().backward()  # initialises the activation steps; gradients reach the latents
    assert net.fc1.weight.grad is not None and net.conv.weight.grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        before = net(x)
    freeze_(net)
    assert isinstance(net.conv, QuantizedConv2d) and type(net.fc1) is QuantizedLinear
    with torch.no_grad():
        assert torch.equal(net(x), before)
    save_quantized(net, tmp_path / "ckpt")
    fresh = make_net(seed=1)
    load_quantized(fresh, tmp_path / "ckpt")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), before)


def test_binary_forward_is_alpha_times_sign():
    layer = QATLinear(nn.Linear(16, 4), QATConfig(BinaryConfig(group_size=8), estimator="ste"))
    w = layer.weight.detach().reshape(4, 2, 8)
    alpha = round_to_fp16(w.abs().mean(-1, keepdim=True))
    expected = (alpha * torch.where(w >= 0, 1.0, -1.0)).reshape(4, 16)
    assert torch.equal(layer.quantized_weight().detach(), expected)


def test_ternary_forward_is_bitnet_roundclip():
    layer = QATLinear(nn.Linear(12, 3), QATConfig(TernaryConfig(), estimator="ste"))
    w = layer.weight.detach()
    gamma = round_to_fp16(w.abs().mean(-1, keepdim=True))
    assert torch.equal(layer.quantized_weight().detach(),
                       gamma * torch.round((w / gamma).clamp(-1, 1)))


def test_nm_forward_keeps_two_largest_of_four():
    layer = QATLinear(nn.Linear(8, 2, bias=False), QATConfig(NMSparseConfig(2, 4)))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, -2.0, 0.1, 1.0, 3.0, 0.0, -0.2, 0.3],
                                         [1.0, 2.0, 3.0, 4.0, -4.0, -3.0, -2.0, -1.0]]))
    expected = torch.tensor([[0.0, -2.0, 0.0, 1.0, 3.0, 0.0, 0.0, 0.3],
                             [0.0, 0.0, 3.0, 4.0, -4.0, -3.0, 0.0, 0.0]])
    assert torch.equal(layer.quantized_weight().detach(), round_to_fp16(expected))


def _sign_slope(name: str, u: torch.Tensor, o: float = 1.0) -> torch.Tensor:
    if name == "ste":
        return torch.ones_like(u)
    if name == "clipped_ste":
        return (u.abs() <= 1).float()
    if name == "approx_sign":
        return (2 * (1 - u.abs())).clamp(min=0)
    t, m = 1.5, 0.1  # reste
    slope = (1 / o) * u.abs().clamp(min=m).pow((1 - o) / o)
    slope = torch.where(u.abs() <= m, torch.full_like(u, m ** (1 / o) / m), slope)
    return torch.where(u.abs() > t, torch.zeros_like(u), slope)


@pytest.mark.parametrize("name", ["ste", "clipped_ste", "approx_sign", "reste"])
def test_binary_latent_gradient_matches_the_estimator_formula(name):
    torch.manual_seed(3)
    layer = QATLinear(nn.Linear(8, 3, bias=False), QATConfig(BinaryConfig(), estimator=name))
    layer.set_progress(0.5)
    o = EstimatorConfig(name).reste_power(0.5) if name == "reste" else 1.0
    g = torch.randn(3, 8)
    layer.quantized_weight().backward(g)
    w = layer.weight.detach()
    alpha = round_to_fp16(w.abs().mean(-1, keepdim=True))
    u = w / alpha
    signs = torch.where(w >= 0, 1.0, -1.0)
    # y = alpha * s(w / sg(alpha)): the estimator's slope, plus alpha's own path
    # d alpha / d w = sign(w) / in (the fp16 rounding is straight-through)
    expected = g * _sign_slope(name, u, o) + (g * signs).sum(-1, keepdim=True) * signs / 8
    torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-6)


def test_sr_ste_gradient_adds_decay_on_pruned_weights():
    layer = QATLinear(nn.Linear(4, 1, bias=False),
                      QATConfig(NMSparseConfig(2, 4), EstimatorConfig("sr_ste", sr_ste_decay=0.1)))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -0.25, 2.0, 0.5]]))
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    layer.quantized_weight().backward(g)
    assert torch.allclose(layer.weight.grad, torch.tensor([[1.0, 2.0 - 0.025, 3.0, 4.05]]))


def test_lsq_step_gets_lsq_gradient():
    layer = QATLinear(nn.Linear(4, 1, bias=False),
                      QATConfig(UniformConfig(bits=2, group_size=None, symmetric=True),
                                EstimatorConfig("lsq", lsq_grad_scale=1.0)))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.3, -0.9, 2.0, 0.05]]))
        layer.projection.step.fill_(0.5)
    layer.quantized_weight().sum().backward()
    v = torch.tensor([0.6, -1.8, 4.0, 0.1])  # w / s; the grid is [-2, 1]
    expected = torch.where(v > 1, 1.0, torch.where(v < -2, -2.0, v.round() - v)).sum()
    torch.testing.assert_close(layer.projection.step.grad.sum(), expected)
    assert torch.equal(layer.weight.grad, torch.tensor([[1.0, 1.0, 0.0, 1.0]]))


def test_stochastic_rounding_is_random_in_training_and_nearest_in_eval():
    layer = QATLinear(nn.Linear(64, 16), QATConfig(TernaryConfig(), "stochastic_rounding"))
    layer.eval()
    a, b = layer.quantized_weight(), layer.quantized_weight()
    assert torch.equal(a, b)
    layer.train()
    draws = {tuple(layer.quantized_weight().flatten().tolist()) for _ in range(3)}
    assert len(draws) > 1


def test_reste_power_follows_the_schedule():
    net = make_net()
    quantize_(net, QATConfig(BinaryConfig(), estimator="reste"))
    schedule = QATSchedule(net, total_steps=4)
    seen = []
    for _ in range(4):
        schedule.step()
        seen.append(net.fc1.projection.est.reste_power(net.fc1.progress))
    assert seen[-1] == pytest.approx(3.0) and seen == sorted(seen) and seen[0] > 1.0


def test_sign_activations_are_plus_minus_one():
    layer = QATLinear(nn.Linear(6, 2),
                      QATConfig(BinaryConfig(), activations=ActivationQuantConfig(bits=1)))
    x = torch.tensor([[-0.5, 0.0, 0.2, -3.0, 1.0, 0.7]])
    seen = []
    layer.input_quantizer.register_forward_hook(lambda m, i, o: seen.append(o))
    layer(x)
    assert torch.equal(seen[0], torch.tensor([[-1.0, 1.0, 1.0, -1.0, 1.0, 1.0]]))


@pytest.mark.parametrize(("rep", "est", "msg"), [
    (BinaryConfig(), "lsq", "does not apply"),
    (NMSparseConfig(), "reste", "does not apply"),
    (UniformConfig(bits=2, group_size=8), "lsq", "symmetric"),
    (BinaryConfig(), "nope", "unknown estimator"),
])
def test_bad_estimator_choices_say_what_to_use(rep, est, msg):
    with pytest.raises(ConfigError, match=msg):
        quantize_(make_net(), QATConfig(rep, estimator=est))


def test_shape_errors_name_the_layer():
    net = make_net()
    with pytest.raises(ConfigError, match="'conv'.*does not divide in_features=72"):
        quantize_(net, QATConfig(BinaryConfig(group_size=64)))
    assert type(net.fc1) is nn.Linear  # all or nothing


def test_freeze_without_qat_layers_is_an_error():
    with pytest.raises(ConfigError, match="no QAT layer"):
        freeze_(make_net())


def test_a_frozen_qat_model_fine_tunes_with_pv():
    """The frozen model is an ordinary pvtune model: PV-Tuning continues from it."""
    from pvtune.optim import PVOptimizer, VStepConfig, continuous_parameters

    net = make_net()
    quantize_(net, QATConfig(TernaryConfig(), estimator="lsq"), filter_fn=lambda m, n: n != "fc2")
    x, y = torch.randn(16, 8, 4, 4), torch.randint(0, 8, (16,))
    net(x).sum().backward()
    freeze_(net)
    base = torch.optim.Adam(continuous_parameters(net), lr=1e-3)
    opt = PVOptimizer(net, base, VStepConfig(strategy="subspace_v_ste", tau=0.5, lr=1.0))
    codes = net.fc1.qweight.codes.clone()
    for _ in range(3):
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(codes, net.fc1.qweight.codes)  # the V step moved codes
    assert int(net.fc1.qweight.codes.max()) <= 2
