"""Shared fixtures: deterministic seeds, small weights, a bounded hypothesis profile."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "pvtune", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "pvtune"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    reference, approx = reference.detach(), approx.detach()
    noise = (reference - approx).pow(2).sum()
    return float(10 * torch.log10(reference.pow(2).sum() / noise))


@pytest.fixture
def gaussian_weight() -> torch.Tensor:
    return torch.randn(128, 512, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def heavy_tailed_weight() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.distributions.StudentT(3.0).sample((128, 512))


# tiny local LMs for the CLI tests too (defined beside the LLM tests)
from tests.llm.conftest import llama_dir, text_file  # noqa: E402, F401
