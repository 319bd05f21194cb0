"""Scale equivariance of the discrete step: on a model whose weights are 8x smaller (and
whose function is unchanged), PV-Tuning takes exactly the same code decisions."""

from __future__ import annotations

import copy

import pytest
import torch

from pvtune import AQLMConfig, BinaryConfig, UniformConfig, quantize_
from pvtune.llm.finetune import kl_loss
from pvtune.optim import PVOptimizer, VStepConfig
from pvtune.optim.strategies import STRATEGIES
from tests.llm.conftest import build_model

SCALE = 8.0  # a power of two: the rescaled model computes bit-identical outputs
# relative steps large enough that codes move within 6 steps of this tiny model
LR = {"ste": 0.3, "stochastic_rounding": 0.3, "subspace_v_ste": 0.3, "linearized_v": 0.3,
      "subspace_v": 0.3}
# grouped codebooks are not here: their float16 levels near zero are subnormal on the 8x
# smaller model (one of this tiny model's v_proj levels is 7e-6), so the two models' levels
# differ beyond a factor 8; test_proximal.py checks the proximal step's own equivariance
CONFIGS = [UniformConfig(bits=2, group_size=16), BinaryConfig(group_size=16),
           AQLMConfig(num_codebooks=1, nbits_per_codebook=4, in_group_size=8, kmeans_iters=3)]
CASES = [(c, s) for c in CONFIGS for s in STRATEGIES.names() if s not in ("frozen",
                                                                          "proximal_v")]


def rescaled(model):
    """A copy with every norm weight times 8 and the linears it feeds (q, k, v, gate, up)
    divided by 8: the same function, with most weights 8x smaller."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for layer in other.model.layers:
            layer.input_layernorm.weight.mul_(SCALE)
            layer.post_attention_layernorm.weight.mul_(SCALE)
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight.div_(SCALE)
    return other


def in_blocks(module, name):
    return ".layers." in name


def codes_of(model):
    return {n: b.clone() for n, b in model.named_buffers()
            if n.endswith((".codes", ".pattern"))}


@pytest.mark.parametrize(("config", "strategy"), CASES,
                         ids=[f"{s}-{c.type_name}" for c, s in CASES])
def test_pv_takes_the_same_decisions_on_a_rescaled_model(config, strategy):
    teacher = build_model("llama", 300)
    small = rescaled(teacher)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = teacher(input_ids=ids).logits
        assert torch.equal(small(input_ids=ids).logits, target)
    models = [copy.deepcopy(teacher), small]
    opts = []
    for model in models:
        quantize_(model, config, filter_fn=in_blocks)
        # continuous parameters frozen: Adam's step on a scale is not scale-equivariant,
        # the code step must be
        model.requires_grad_(False)
        opts.append(PVOptimizer(model, torch.optim.SGD([torch.zeros(1, requires_grad=True)],
                                                        lr=0.0),
                                VStepConfig(strategy=strategy, tau=0.05, lr=LR[strategy])))
    changed = 0
    for _ in range(6):
        stats = []
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            model.train()
            kl_loss(model(input_ids=ids).logits, target).backward()
            stats.append(opt.step().groups_changed)
        assert stats[0] == stats[1]
        changed += stats[0]
        a, b = codes_of(models[0]), codes_of(models[1])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert changed > 0  # the comparison is not vacuous: codes did move
