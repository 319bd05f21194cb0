"""A quick tour of the weight representations on one random layer (no downloads)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from pvtune.reprs import (
    AQLMConfig,
    BinaryConfig,
    NMSparseConfig,
    ReprConfig,
    TernaryConfig,
    UniformConfig,
    VQConfig,
    representation_for,
)

DEMO_CONFIGS: tuple[ReprConfig, ...] = (
    UniformConfig(bits=4, group_size=64),
    UniformConfig(bits=3, group_size=64),
    UniformConfig(bits=2, group_size=64),
    UniformConfig(bits=2, group_size=64, symmetric=True),
    BinaryConfig(),
    TernaryConfig(),
    NMSparseConfig(n=2, m=4),
    VQConfig(num_codewords=256, group_size=4),
    AQLMConfig.preset("2x8g8"),
    AQLMConfig.preset("1x8g8"),
)


def representation_table(
    out_features: int = 512,
    in_features: int = 2048,
    configs: Sequence[ReprConfig] = DEMO_CONFIGS,
    seed: int = 0,
) -> list[dict]:
    """Compress one Gaussian ``[out, in]`` weight with each config: SQNR, bits/param, time."""
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    rows = []
    for config in configs:
        start = time.perf_counter()
        rep = representation_for(config).from_dense(weight, config)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            err = (rep() - weight).pow(2).sum()
        rows.append({
            "representation": config.type_name,
            "config": _short(config),
            "sqnr_db": float(10 * torch.log10(weight.pow(2).sum() / err)),
            "bits_per_param": rep.bits_per_param(),
            "seconds": seconds,
        })
    return rows


def _short(config: ReprConfig) -> str:
    fields = {k: v for k, v in config.to_dict().items()
              if k not in ("type", "seed", "kmeans_iters", "scale_search")}
    return ", ".join(f"{k}={v}" for k, v in fields.items())
