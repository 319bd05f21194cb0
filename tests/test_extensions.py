"""Extension points work end to end for code defined outside pvtune: a QAT estimator, a
weight representation, a discrete-step strategy, an initialiser, an input quantizer and a row
grouping, each registered here."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from pvtune import BinaryConfig, quantize_
from pvtune.checkpoint.format import load_quantized, save_quantized
from pvtune.estimators import binary_sign
from pvtune.init.registry import register_init
from pvtune.optim import PVOptimizer, VStepConfig
from pvtune.optim.strategies import register_strategy
from pvtune.packing import BitCodec
from pvtune.qat import EstimatorConfig, QATConfig, freeze_
from pvtune.qat.rules import register_qat_estimator
from pvtune.reprs.base import QuantizedWeight, ReprConfig, register_representation, round_to_fp16

# -- a QAT estimator: sign forward, the gradient times a constant ----------------------------


class ScaledSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return binary_sign(u)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def half_ste(u, est, progress):
    return ScaledSign.apply(u, 0.5)


def zero_ste(u, est, progress):
    return ScaledSign.apply(u, 0.0)


def latent_grad(estimator: str) -> Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4, bias=False))
    quantize_(model, QATConfig(BinaryConfig(group_size=8), estimator=estimator))
    x = torch.randn(5, 16)
    model(x).pow(2).sum().backward()
    return model[0].weight.grad.clone()


def test_a_registered_qat_estimator_trains_with_its_own_gradient():
    """The latent weight's gradient has a scale path (alpha = mean|w|) and a sign path; the
    sign path is what the estimator sets: halving it halves that part exactly."""
    assert EstimatorConfig("test_half_ste").name == "test_half_ste"
    ste, half, zero = latent_grad("ste"), latent_grad("test_half_ste"), latent_grad("test_zero_ste")
    assert not torch.allclose(ste, zero)
    torch.testing.assert_close(half - zero, 0.5 * (ste - zero))
    model = nn.Sequential(nn.Linear(16, 4, bias=False))
    quantize_(model, QATConfig(BinaryConfig(group_size=8), estimator="test_half_ste"))
    freeze_(model)  # the result is an ordinary compressed model


def test_an_estimator_registered_for_another_kind_is_refused_with_the_choices():
    from pvtune.errors import ConfigError
    from pvtune.reprs import UniformConfig

    with pytest.raises(ConfigError, match="does not apply to .* use one of: ste"):
        QATConfig(UniformConfig(bits=2, group_size=8), estimator="test_half_ste")


# -- a representation: per-row scale times {-1, 0, +1} -----------------------------------------


@dataclass(frozen=True)
class RowTernaryConfig(ReprConfig):
    """Levels {-s, 0, s} with one fp16 scale ``s`` per row; codes 2 bits each."""


class RowTernaryWeight(QuantizedWeight):
    config_cls = RowTernaryConfig
    step_unit_kind = "grid"

    def __init__(self, out_features: int, in_features: int, config: RowTernaryConfig) -> None:
        super().__init__(out_features, in_features, config)
        self.scale = nn.Parameter(torch.ones(out_features, 1))
        self.register_buffer("codes", torch.ones(out_features, in_features, dtype=torch.uint8))

    def init_from_dense(self, weight: Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(round_to_fp16(weight.abs().mean(-1, keepdim=True).clamp(min=1e-4)))
        self.encode(weight)

    def forward(self) -> Tensor:
        return self.scale * (self.codes.to(self.scale.dtype) - 1)

    def encode(self, target: Tensor, groups: Tensor | None = None,
               beam_size: int | None = None) -> None:
        target, groups = self._check_inputs(target, groups, beam_size)
        with torch.no_grad():
            nearest = (torch.round(target / self.scale).clamp(-1, 1) + 1).to(torch.uint8)
            self.codes.copy_(nearest if groups is None else torch.where(groups, nearest,
                                                                        self.codes))

    def step_unit(self) -> Tensor:
        return self.scale.detach().abs()

    def bits_per_param(self) -> float:
        return 2 + 16 / self.in_features

    def integer_codecs(self):
        return {"codes": BitCodec(2)}


# -- a strategy: the nearest codes of W - lr * grad, for a random half of the rows -------------


def half_rows(rep, grad, state, config, generator) -> None:
    rows = torch.rand(rep.out_features, generator=generator) < 0.5
    with torch.no_grad():
        target = rep() - config.step_size * grad / grad.abs().max().clamp(min=1e-12) \
            * rep.step_unit()
    rep.encode(target, rows[:, None].expand(rep.groups_shape))


# -- an initialiser: round to nearest after shrinking the weight by the calibration RMS --------


@dataclass(frozen=True)
class ShrinkConfig:
    factor: float = 0.9


def shrink_init(weight, xtx, repr_config, method_config):
    from pvtune.reprs.base import representation_for

    assert xtx is not None and xtx.shape == (weight.shape[1], weight.shape[1])
    return representation_for(repr_config).from_dense(weight * method_config.factor, repr_config)


@pytest.fixture(scope="module", autouse=True)
def registered():
    """Register this file's extensions as a user's code would, and remove them afterwards
    (other tests enumerate the registries)."""
    from pvtune.init.registry import INIT_METHODS
    from pvtune.optim.strategies import STRATEGIES
    from pvtune.qat.rules import RULES
    from pvtune.reprs.base import CONFIG_TYPES, REPRESENTATIONS

    register_qat_estimator("test_half_ste", "sign")(half_ste)
    register_qat_estimator("test_zero_ste", "sign")(zero_ste)
    register_representation("test_row_ternary")(RowTernaryWeight)
    register_strategy("test_half_rows", needs_buffer=False)(half_rows)
    register_init("test_shrink", ShrinkConfig, (ReprConfig,), needs_calibration=True)(
        shrink_init)
    yield
    RULES["sign"].unregister("test_half_ste")
    RULES["sign"].unregister("test_zero_ste")
    CONFIG_TYPES.unregister("test_row_ternary")
    REPRESENTATIONS.unregister(RowTernaryConfig)
    STRATEGIES.unregister("test_half_rows")
    INIT_METHODS.unregister("test_shrink")


def toy(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))
    x = torch.randn(64, 16, generator=g)
    with torch.no_grad():
        target = model(x)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g) * p.abs().mean())
    return model, x, target


def test_a_registered_representation_saves_bit_exact_and_trains_with_a_registered_strategy(
        tmp_path):
    model, x, target = toy()
    quantize_(model, RowTernaryConfig())
    assert type(model[0].qweight) is RowTernaryWeight
    save_quantized(model, tmp_path / "ckpt")
    fresh, _, _ = toy()
    quantize_(fresh, RowTernaryConfig())
    for p in fresh[0].qweight.codes, fresh[2].qweight.codes:
        p.zero_()
    load_quantized(fresh, tmp_path / "ckpt")
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    opt = PVOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-2),
                      VStepConfig(strategy="test_half_rows", lr=0.5))
    start = float((model(x) - target).pow(2).mean().detach())
    changed = 0
    for _ in range(20):
        opt.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        changed += opt.step().groups_changed
    assert changed > 0
    assert float((model(x) - target).pow(2).mean().detach()) < start


def test_a_registered_initialiser_compresses_a_language_model():
    from pvtune.llm.pipeline import CompressConfig, compress_model
    from pvtune.nn.quantize import quantized_layers
    from tests.llm.conftest import build_model

    model = build_model("llama", 64).eval()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    config = CompressConfig(method="test_shrink", representation=RowTernaryConfig(),
                            method_config=ShrinkConfig(factor=0.5))
    compress_model(model, ids, config, progress=False)
    layers = quantized_layers(model)
    assert layers and all(type(m.qweight) is RowTernaryWeight for m in layers.values())
    name, layer = next(iter(layers.items()))
    dense = reference.get_submodule(name).weight
    expected = RowTernaryWeight.from_dense(dense * 0.5, RowTernaryConfig())
    assert torch.equal(layer.qweight.codes, expected.codes)


# -- an input quantizer kind and a row grouping, registered here -------------------------------


def test_a_registered_input_quantizer_saves_and_reloads_with_its_layer(tmp_path):
    from pvtune.nn import QuantizedLinear
    from pvtune.nn.input_quantizers import INPUT_QUANTIZER_KINDS, register_input_quantizer
    from pvtune.reprs import UniformConfig

    @register_input_quantizer("halve-test")
    class Halve(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x / 2

        def to_spec(self) -> dict:
            return {}

        @classmethod
        def from_spec(cls, spec: dict) -> Halve:
            return cls()

    try:
        model = nn.Sequential(nn.Linear(16, 8))
        quantize_(model, UniformConfig(bits=4, group_size=16))
        model[0].input_quantizer = Halve()
        x = torch.randn(3, 16)
        expected = model(x)
        save_quantized(model, tmp_path)
        fresh = nn.Sequential(nn.Linear(16, 8))
        load_quantized(fresh, tmp_path)
        assert isinstance(fresh[0], QuantizedLinear) and isinstance(fresh[0].input_quantizer,
                                                                    Halve)
        assert torch.equal(fresh(x), expected)
    finally:
        INPUT_QUANTIZER_KINDS.unregister("halve-test")


def test_a_registered_grouping_clusters_the_rows():
    from pvtune.reprs import GroupedCodebookConfig, GroupedCodebookWeight
    from pvtune.reprs.grouped_codebook import GROUPINGS, register_grouping

    @register_grouping("sign-of-mean-test")
    def sign_of_mean(weight: Tensor) -> Tensor:
        return weight.mean(1, keepdim=True).sign()

    try:
        w = torch.randn(8, 32)
        w[::2] += 3.0
        rep = GroupedCodebookWeight.from_dense(
            w, GroupedCodebookConfig(bits=2, groups=2, grouping="sign-of-mean-test"))
        assert rep.row_group[0] != rep.row_group[1] and rep.row_group[0] == rep.row_group[2]
    finally:
        GROUPINGS.unregister("sign-of-mean-test")
