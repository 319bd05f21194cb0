"""Image training: datasets, the model, and a short digits run per estimator that learns
and whose frozen model is what was trained."""

from __future__ import annotations

import pytest
import torch

from pvtune.errors import ConfigError
from pvtune.nn import QuantizedConv2d, QuantizedLinear
from pvtune.qat import ActivationQuantConfig, QATConfig
from pvtune.reprs import BinaryConfig, NMSparseConfig, TernaryConfig, UniformConfig
from pvtune.vision import PVMethod, SmallCNN, TrainConfig, load_images, train_classifier

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_images("digits", root=tmp_path_factory.mktemp("datasets"))


def test_digits_split_is_fixed_and_disjoint(digits, tmp_path):
    again = load_images("digits", root=tmp_path)
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)
    assert digits.train_x.shape[1:] == (1, 8, 8) and len(digits.train_x) + len(digits.test_x) \
        == 1797
    assert 0.0 <= float(digits.train_x.min()) and float(digits.train_x.max()) <= 1.0
    train = {tuple(x.flatten().tolist()) for x in digits.train_x}
    assert sum(tuple(x.flatten().tolist()) in train for x in digits.test_x) < 10  # duplicates


SIGN = ActivationQuantConfig(bits=1)
RUNS = [
    ("fp32", None, "relu"),
    ("binary ste", QATConfig(BinaryConfig(), "ste"), "relu"),
    ("binary clipped", QATConfig(BinaryConfig(), "clipped_ste"), "relu"),
    ("binary approx_sign W/A", QATConfig(BinaryConfig(), "approx_sign", SIGN), "identity"),
    ("binary reste W/A", QATConfig(BinaryConfig(), "reste", SIGN), "identity"),
    ("ternary lsq", QATConfig(TernaryConfig(), "lsq"), "relu"),
    ("ternary stochastic", QATConfig(TernaryConfig(), "stochastic_rounding"), "relu"),
    ("uniform2 ste", QATConfig(UniformConfig(bits=2, group_size=None)), "relu"),
    ("2:4 sr_ste", QATConfig(NMSparseConfig(2, 4), "sr_ste"), "relu"),
    ("2:4 ste", QATConfig(NMSparseConfig(2, 4), "ste"), "relu"),
    ("pv binary", PVMethod(BinaryConfig()), "relu"),
]


@pytest.mark.parametrize(("label", "method", "act"), RUNS, ids=[r[0] for r in RUNS])
def test_two_epochs_on_digits_learn(digits, label, method, act):
    config = TrainConfig(method=method, epochs=2, batch_size=32, act=act, seed=0)
    result = train_classifier(config, digits, progress=False)
    assert result.test_accuracy > 0.5, (label, result.history)  # chance is 0.1
    assert len(result.history) == 2
    if method is not None:  # the hidden layers now hold codes
        assert isinstance(result.model.conv1, QuantizedConv2d)
        assert isinstance(result.model.fc, QuantizedLinear)
        assert result.bits_per_param < 32
    if isinstance(method, QATConfig):
        # training from scratch moves the latent weights across their code boundaries
        assert result.history[0]["flips"] > 0, result.history


def test_bad_config_is_refused():
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="method"):
        TrainConfig(method=BinaryConfig())


def test_small_cnn_shapes():
    net = SmallCNN(1, 28, 10, width=4, hidden=8)
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="divisible by 4"):
        SmallCNN(1, 30)


def test_torch_pruning_peer_learns_with_exact_2_4_masks(digits):
    from pvtune.vision import TorchPruningPeer

    config = TrainConfig(method=TorchPruningPeer(2, 4), arch="mlp", hidden=64, epochs=2,
                         batch_size=32)
    result = train_classifier(config, digits, progress=False)
    assert result.test_accuracy > 0.5
    for layer in result.model.hidden:
        kept = (layer.weight.reshape(layer.out_features, -1, 4) != 0).sum(-1)
        assert int(kept.max()) <= 2
    assert (result.model.stem.weight != 0).float().mean() > 0.9  # the stem stays dense


def test_mlp_arch_with_qat_quantizes_hidden_layers_only(digits):
    config = TrainConfig(method=QATConfig(NMSparseConfig(2, 4), "sr_ste"), arch="mlp",
                         hidden=64, epochs=1, batch_size=32)
    model = train_classifier(config, digits, progress=False).model
    assert all(isinstance(layer, QuantizedLinear) for layer in model.hidden)
    assert type(model.stem) is torch.nn.Linear and type(model.head) is torch.nn.Linear


def test_peer_needs_the_mlp():
    from pvtune.vision import TorchPruningPeer

    with pytest.raises(ConfigError, match="linear layers only"):
        TrainConfig(method=TorchPruningPeer())
