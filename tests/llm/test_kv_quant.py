"""Key/value quantization: per head and token as its formula says, applied to the cache that
generation uses exactly as in a full forward pass, on every architecture family; the query/key
rotation alone changes nothing."""

from __future__ import annotations

import pytest
import torch

from pvtune.llm.kv_quant import KVQuantizer, attach_kv_quantizers_, detach_kv_quantizers_
from pvtune.nn.token_quant import TokenQuantConfig, quantize_tokens
from pvtune.rotation.online import OnlineRotation
from tests.llm.conftest import ARCHITECTURES, build_model


def tiny(kind: str):
    extra = {"head_dim": 8} if "head_dim" in ARCHITECTURES[kind][2] else {}
    return build_model(kind, 300, hidden_size=64, **extra).eval()


def test_keys_and_values_are_quantized_per_token_and_head():
    kv = KVQuantizer(TokenQuantConfig(3, 0.9), head_dim=8)
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    q2, k2, v2 = kv(q, k, v)
    assert torch.equal(q2, q)
    for b in range(2):
        for h in range(4):
            for t in range(5):  # each head of each token on its own grid
                torch.testing.assert_close(k2[b, h, t], quantize_tokens(k[b, h, t][None], 3,
                                                                        0.9)[0])
                torch.testing.assert_close(v2[b, h, t], quantize_tokens(v[b, h, t][None], 3,
                                                                        0.9)[0])


def test_the_query_key_rotation_keeps_every_attention_score():
    rot = OnlineRotation(8, torch.Generator().manual_seed(0))
    kv = KVQuantizer(TokenQuantConfig(16), head_dim=8, rotation=rot)
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64) for _ in range(3))
    q2, k2, v2 = kv(q, k, v)
    torch.testing.assert_close(q2 @ k2.transpose(-1, -2), q @ k.transpose(-1, -2))
    assert not torch.allclose(k2, k) and torch.equal(v2, v)


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_the_cache_in_generation_is_quantized_as_in_a_full_forward_pass(kind):
    model = tiny(kind)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(ids).logits
        quantizers = attach_kv_quantizers_(model, TokenQuantConfig(16), rotate={0, 1})
        assert len(quantizers) == 2
        rotated = model(ids).logits  # R3 alone: the same function
        torch.testing.assert_close(rotated, reference, atol=1e-5, rtol=1e-4)
        for q in quantizers.values():
            q.config = TokenQuantConfig(3)
        full = model(ids).logits
        assert (full - reference).abs().max() > 1e-3  # the quantization is really applied
        out = model(ids[:, :5], use_cache=True)
        steps, cache = [out.logits[:, -1]], out.past_key_values
        for t in range(5, 11):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits[:, -1])
            cache = out.past_key_values
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:11], atol=1e-5, rtol=1e-4)


def test_detaching_restores_the_original_function():
    model = tiny("llama")
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        reference = model(ids).logits
        attach_kv_quantizers_(model, TokenQuantConfig(2))
        detach_kv_quantizers_(model)
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-6, rtol=1e-5)
    assert not any(isinstance(m, KVQuantizer) for m in model.modules())
