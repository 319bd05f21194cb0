"""VQ bottleneck: nearest-codeword forward, straight-through / rotated backward, the usage
metric on hand-made assignments, EMA and VQBridge updates."""

from __future__ import annotations

import math

import pytest
import torch

from pvtune.discrete import (
    CodebookUsage,
    VectorQuantizer,
    VQBottleneckConfig,
    learning_annealing,
    rotate_to,
)
from pvtune.errors import ConfigError


def _vq(update: str, k: int = 64, d: int = 4, **kw) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(VQBottleneckConfig(k, d, update=update, bridge_group=8, **kw))


@pytest.mark.parametrize("update", ["plain", "ema", "rotation", "vqbridge"])
def test_forward_is_the_nearest_codeword(update):
    vq = _vq(update)
    z = torch.randn(3, 5, 4)
    book = vq.effective_codebook().detach().clone()  # (EMA moves it during the call)
    encoded = vq.encode(z)
    out = vq(z)
    brute = torch.cdist(z.reshape(-1, 4), book).argmin(-1).reshape(3, 5)
    assert torch.equal(out.codes, brute)
    torch.testing.assert_close(out.quantized, book[brute], rtol=0, atol=1e-6)
    assert torch.equal(encoded, brute)
    if update != "ema":
        torch.testing.assert_close(vq.decode(brute), book[brute])


def test_normalized_lookup_uses_unit_vectors():
    torch.manual_seed(0)
    vq = VectorQuantizer(VQBottleneckConfig(32, 4, normalize=True, init="normal"))
    z = 5 * torch.randn(20, 4)
    out = vq(z)
    book = torch.nn.functional.normalize(vq.codebook.detach(), dim=-1)
    zn = torch.nn.functional.normalize(z, dim=-1)
    assert torch.equal(out.codes, (zn @ book.t()).argmax(-1))
    torch.testing.assert_close(out.quantized.norm(dim=-1), torch.ones(20))


def test_straight_through_passes_the_gradient_unchanged():
    vq = _vq("plain")
    z = torch.randn(10, 4, requires_grad=True)
    g = torch.randn(10, 4)
    (vq(z).quantized * g).sum().backward()
    torch.testing.assert_close(z.grad, g)


def test_rotation_trick_gradient_is_the_rotated_scaled_gradient():
    torch.manual_seed(1)
    z = torch.randn(6, 3, requires_grad=True)
    e = torch.randn(6, 3)
    g = torch.randn(6, 3)
    out = rotate_to(z, e)
    torch.testing.assert_close(out, e)
    (out * g).sum().backward()
    for i in range(6):
        zi, ei = z[i].detach(), e[i]
        u, q = zi / zi.norm(), ei / ei.norm()
        w = (u + q) / (u + q).norm()
        rot = torch.eye(3) - 2 * torch.outer(w, w) + 2 * torch.outer(q, u)
        torch.testing.assert_close(rot @ zi, ei * zi.norm() / ei.norm(), atol=1e-5, rtol=1e-5)
        expected = (ei.norm() / zi.norm()) * rot.t() @ g[i]
        torch.testing.assert_close(z.grad[i], expected, atol=1e-5, rtol=1e-5)


def test_losses_are_codebook_plus_commitment():
    vq = _vq("plain", commitment=0.25)
    z = torch.randn(20, 4)
    out = vq(z)
    e = vq.codebook.detach()[out.codes]
    mse = ((z - e) ** 2).mean()
    torch.testing.assert_close(out.loss, 1.25 * mse)
    ema = _vq("ema", commitment=0.25)
    out = ema.eval()(z)
    torch.testing.assert_close(out.loss, 0.25 * ((z - ema.codebook[out.codes]) ** 2).mean())


def test_usage_counts_distinct_codes_in_the_window():
    usage = CodebookUsage(num_codes=10, window=6)
    assert usage.value() == 0.0
    usage.update(torch.tensor([1, 1, 2]))
    assert usage.value() == pytest.approx(0.2)
    usage.update(torch.tensor([[3, 4], [5, 6]]))  # window now 2, 3, 4, 5, 6 and one 1
    assert usage.value() == pytest.approx(0.6)
    usage.update(torch.tensor([7, 7, 7, 7, 7, 7]))  # pushes every earlier code out
    assert usage.value() == pytest.approx(0.1)
    usage.reset()
    assert usage.value() == 0.0


def test_training_records_usage_and_eval_does_not():
    vq = _vq("plain", k=16)
    vq.eval()(torch.randn(50, 4))
    assert vq.usage() == 0.0
    out = vq.train()(torch.randn(50, 4))
    assert vq.usage() == pytest.approx(out.codes.unique().numel() / 16)


def test_ema_moves_assigned_codewords_to_the_mean_of_their_vectors():
    vq = _vq("ema", k=8, d=2, ema_decay=0.5, ema_epsilon=0.0)
    before = vq.codebook.clone()
    z = torch.randn(40, 2)
    codes = vq(z).codes
    c = int(codes[0])
    members = z[codes == c]
    count = 0.5 * 1 + 0.5 * len(members)
    expected = (0.5 * before[c] + 0.5 * members.sum(0)) / count
    torch.testing.assert_close(vq.codebook[c], expected, atol=1e-5, rtol=1e-5)
    unused = [i for i in range(8) if i not in codes.tolist()]
    for i in unused:  # decayed sum / decayed count: unchanged
        torch.testing.assert_close(vq.codebook[i], before[i], atol=1e-6, rtol=1e-6)


def test_vqbridge_moves_every_codeword_in_one_step_and_plain_does_not():
    torch.manual_seed(3)
    z = torch.randn(40, 4)  # 40 vectors: at most 40 of 256 codewords assigned
    for update, all_move in (("vqbridge", True), ("plain", False)):
        vq = _vq(update, k=256)
        opt = torch.optim.SGD(vq.parameters(), lr=0.1)
        before = vq.effective_codebook().detach().clone()
        out = vq(z)
        out.loss.backward()
        opt.step()
        moved = (vq.effective_codebook().detach() - before).norm(dim=-1) > 0
        assert bool(moved.all()) is all_move
        assert int(moved.sum()) >= out.codes.unique().numel()
        assert out.codes.unique().numel() <= 40
    vq = _vq("vqbridge")
    torch.testing.assert_close(vq.effective_codebook(), vq.codebook)  # starts as identity


def test_learning_annealing_warms_holds_and_decays_to_one_percent():
    total = 1000
    f = [learning_annealing(s, total) for s in range(total + 1)]
    assert f[0] == pytest.approx(1 / 50) and f[49] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[50:301])
    assert all(a >= b for a, b in zip(f[300:], f[301:], strict=False))
    assert f[-1] == pytest.approx(0.01)
    assert f[650] == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_bad_settings_say_what_to_change():
    with pytest.raises(ConfigError, match="update must be one of"):
        VQBottleneckConfig(8, 2, update="kmeans")
    with pytest.raises(ConfigError, match="multiple"):
        VQBottleneckConfig(10, 2, update="vqbridge", bridge_group=4)
    with pytest.raises(ConfigError, match="last axis has 3"):
        _vq("plain")(torch.randn(2, 3))


def test_lookup_in_small_distance_blocks_equals_one_block():
    torch.manual_seed(2)
    flat, book = torch.randn(37, 4), torch.randn(32, 4)
    whole = VectorQuantizer._nearest(flat, book)
    blocks = VectorQuantizer._nearest(flat, book, entries=64)  # 2 rows per block
    assert torch.equal(whole, blocks)
    assert torch.equal(whole, torch.cdist(flat, book).argmin(-1))
