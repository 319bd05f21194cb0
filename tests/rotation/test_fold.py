"""Folded rotations keep every architecture's function: logits equal the original's within
float32 tolerance on tiny random models of each family, tied and untied, with non-trivial
norm scales; what cannot be folded is refused and left unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from pvtune.errors import ConfigError, ModelError
from pvtune.rotation import RotationConfig, rotate_model_
from tests.llm.conftest import ARCHITECTURES, build_model

REFUSED = {"gemma2", "gemma3"}  # norms on the residual branch


def tiny(kind: str, tied: bool):
    extra = {"head_dim": 12} if "head_dim" in ARCHITECTURES[kind][2] else {}
    model = build_model(kind, 300, tie_word_embeddings=tied, hidden_size=48,
                        intermediate_size=96, **extra).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norm scales and biases far from their initial values
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("kind", sorted(set(ARCHITECTURES) - REFUSED))
@pytest.mark.parametrize("kind_of_matrix", ["hadamard", "orthogonal"])
def test_rotated_model_computes_the_same_logits(kind, tied, kind_of_matrix):
    model = tiny(kind, tied)
    original = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(3))
    report = rotate_model_(model, RotationConfig(kind=kind_of_matrix))
    with torch.no_grad():
        expected, got = original(ids).logits, model(ids).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert report.relative_logit_error < 1e-5
    assert report.residual == ("hadamard 12x4" if kind_of_matrix == "hadamard" else "orthogonal")
    assert report.untied_head == tied
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight is not emb.weight and not model.config.tie_word_embeddings
    # the weights really moved, and the norms were folded to unit scale
    assert not torch.allclose(emb.weight, original.get_input_embeddings().weight)
    norm = model.model.norm.weight
    assert torch.all(norm == (0.0 if kind == "gemma" else 1.0))
    if kind == "phi3":  # fused q/k/v: no v_proj to rotate per head
        assert report.heads is None
    else:
        assert report.heads is not None


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_norms_on_the_residual_branch_are_refused_and_leave_the_model_alone(kind):
    model = tiny(kind, True)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match="residual branch"):
        rotate_model_(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_heads_only_rotation_keeps_the_tie():
    model = tiny("llama", True)
    original = copy.deepcopy(model)
    report = rotate_model_(model, RotationConfig(residual=False))
    assert report.residual is None and report.heads == "hadamard 12x1"
    assert not report.untied_head
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=2e-5,
                                   rtol=1e-4)


def test_rotation_config_is_validated():
    with pytest.raises(ConfigError, match="kind must be one of"):
        RotationConfig(kind="givens")
    with pytest.raises(ConfigError, match="enable residual"):
        RotationConfig(residual=False, heads=False)
