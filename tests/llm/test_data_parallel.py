"""The step exchange of data-parallel PV-Tuning, in one process (the collectives themselves
are tested with torchrun in tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pvtune.distributed import DistributedContext
from pvtune.errors import ConfigError
from pvtune.llm.data_parallel import StepExchange, _code_bytes, _write_code_bytes
from pvtune.llm.finetune import FinetuneConfig
from pvtune.nn.quantized_linear import QuantizedLinear
from pvtune.optim import PVOptimizer, VStepConfig
from pvtune.reprs import AQLMConfig, UniformConfig


def layers(config, seed: int) -> dict[str, QuantizedLinear]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in {"a": (32, 64), "b": (64, 64)}.items():
        linear = nn.Linear(shape[1], shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(shape, generator=gen))
        out[name] = QuantizedLinear.from_linear(linear, config)
    return out


@pytest.mark.parametrize("config", [UniformConfig(bits=2, group_size=8),
                                    AQLMConfig(num_codebooks=2, nbits_per_codebook=9,
                                               in_group_size=4, kmeans_iters=2)],
                         ids=["uint8", "int16"])
def test_code_bytes_carry_every_code_buffer_exactly(config):
    source, target = layers(config, 0), layers(config, 1)
    flat = _code_bytes(source)
    assert flat.dtype == torch.uint8
    assert flat.numel() == sum(getattr(m.qweight, n).numel() * getattr(m.qweight, n)
                               .element_size() for m in source.values()
                               for n in m.qweight.code_buffers)
    _write_code_bytes(target, flat)
    for name, layer in source.items():
        for buf in layer.qweight.code_buffers:
            assert torch.equal(getattr(target[name].qweight, buf), getattr(layer.qweight, buf))


def test_one_process_owns_every_weight_and_sends_nothing():
    exchange = StepExchange(DistributedContext(), "owner", layers(UniformConfig(bits=2), 0))
    assert exchange.owned() is None
    assert exchange.bytes_sent == 0


def test_placement_is_validated_and_an_optimizer_rejects_unknown_owned_names():
    with pytest.raises(ConfigError, match="vstep_placement"):
        FinetuneConfig(vstep_placement="everywhere")
    model = nn.Sequential(*layers(UniformConfig(bits=2), 0).values())
    base = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(ConfigError, match="owned"):
        PVOptimizer(model, base, VStepConfig(), owned={"nope"})


def test_the_cli_offers_every_placement_with_the_library_default():
    from pvtune.cli import build_parser
    from pvtune.llm.data_parallel import PLACEMENTS

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["finetune"]
    action = next(a for a in sub._actions if a.dest == "vstep_placement")
    assert tuple(action.choices) == PLACEMENTS
    assert action.default == FinetuneConfig().vstep_placement
