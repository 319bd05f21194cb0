"""Codebook search: k-means, nearest codeword, and beam search for additive codebooks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_ELEMENTS_PER_CHUNK = 1 << 20  # 4 MiB distance matrices: cache-sized, 2x faster than 64 MiB


def _chunk(rows_per_item: int) -> int:
    return max(1, _ELEMENTS_PER_CHUNK // max(1, rows_per_item))


def _compiled(x: Tensor, codebook: Tensor) -> bool:
    """Whether the compiled search takes these operands (imported on first use: numba
    takes a noticeable time to import)."""
    if not (x.device.type == "cpu" and x.dtype == torch.float32):
        return False
    from pvtune.kernels.nearest import nearest_kernel_available

    return nearest_kernel_available(x, codebook)


def nearest(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Index of the nearest codeword (squared L2) for each row of ``x``, and that distance.

    ``x``: ``[N, d]``, ``codebook``: ``[K, d]``; returns ``(index [N], dist [N])``. On the
    CPU in float32 one compiled pass (:mod:`pvtune.kernels.nearest`), else chunked matrix
    products.
    """
    cnorm = codebook.pow(2).sum(-1)
    if _compiled(x, codebook):
        from pvtune.kernels.nearest import nearest_codewords

        idx, part = nearest_codewords(x, codebook, cnorm)
        return idx, (part + x.pow(2).sum(-1)).clamp(min=0)
    idx = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    step = _chunk(codebook.shape[0])
    for s in range(0, x.shape[0], step):
        xs = x[s : s + step]
        d = torch.addmm(cnorm, xs, codebook.T, alpha=-2.0)
        best, arg = d.min(-1)
        idx[s : s + step] = arg
        dist[s : s + step] = (best + xs.pow(2).sum(-1)).clamp(min=0)
    return idx, dist


def kmeans(
    x: Tensor,
    k: int,
    iters: int = 20,
    generator: torch.Generator | None = None,
    max_points: int = 65536,
) -> Tensor:
    """Lloyd's k-means on the rows of ``x`` (``[N, d]``); returns centroids ``[k, d]``.

    Fits on at most ``max_points`` rows sampled with ``generator`` (deterministic given its
    seed); k-means++ seeding for ``k <= 1024``, random distinct rows above; an empty cluster
    is re-seeded with the point farthest from its centroid.
    """
    n = x.shape[0]
    if k > n:
        raise ValueError(f"kmeans: {k} clusters need at least {k} points, got {n}")
    if n > max_points:
        x = x[torch.randperm(n, generator=generator)[: max(max_points, k)]]
        n = x.shape[0]
    centroids = _seed(x, k, generator)
    for _ in range(iters):
        assign, dist = nearest(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        empty = counts == 0
        centroids = torch.where(empty.unsqueeze(-1), centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():
            far = dist.topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    return centroids


def _seed(x: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    n = x.shape[0]
    if k > 1024:
        return x[torch.randperm(n, generator=generator)[:k]].clone()
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    mind = (x - x[first]).pow(2).sum(-1)
    for _ in range(k - 1):
        probs = mind / mind.sum() if mind.sum() > 0 else torch.full_like(mind, 1.0 / n)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        chosen.append(nxt)
        mind = torch.minimum(mind, (x - x[nxt]).pow(2).sum(-1))
    return x[chosen].clone()


def additive_decode(codebooks: Tensor, codes: Tensor) -> Tensor:
    """Sum of one codeword per codebook.

    ``codebooks [M, K, d]``, ``codes [..., M]`` -> ``[..., d]``.
    """
    codes = codes.long()
    out = F.embedding(codes[..., 0], codebooks[0])  # one lookup per codebook: 6x faster
    for j in range(1, codebooks.shape[0]):  # than gathering [..., M, d] and summing
        out = out + F.embedding(codes[..., j], codebooks[j])
    return out


def beam_search(targets: Tensor, codebooks: Tensor, beam_size: int = 1) -> Tensor:
    """Codes whose codeword sum approximates each target: ``targets [N, d]``, ``codebooks
    [M, K, d]`` -> ``codes [N, M]`` (int64).

    Codebooks are visited in order, keeping the ``beam_size`` best partial sums per target.
    The greedy path (best child of the best partial sum) always stays in slot 0, so the
    result is never worse than greedy search (``beam_size=1``).
    """
    m, k, _ = codebooks.shape
    beam = max(1, min(beam_size, k))
    out = torch.empty(targets.shape[0], m, dtype=torch.long, device=targets.device)
    # the compiled greedy search needs no chunks: its distances never leave a scratch row
    whole = beam == 1 and _compiled(targets, codebooks)
    step = max(1, targets.shape[0]) if whole else _chunk(beam * k)
    cnorm = codebooks.pow(2).sum(-1)  # [M, K]
    search = _greedy_chunk if beam == 1 else _beam_chunk
    for s in range(0, targets.shape[0], step):
        out[s : s + step] = search(targets[s : s + step], codebooks, cnorm, beam)
    return out


def _greedy_chunk(t: Tensor, codebooks: Tensor, cnorm: Tensor, beam: int) -> Tensor:
    """``beam_size=1``: the nearest code of each codebook in turn to the remaining residual
    (``||r - c||^2 - ||r||^2 = ||c||^2 - 2 r.c``: one matrix product per codebook)."""
    codes = torch.empty(t.shape[0], codebooks.shape[0], dtype=torch.long, device=t.device)
    resid = t
    compiled = _compiled(t, codebooks)
    if compiled:
        from pvtune.kernels.nearest import nearest_codewords
    for j in range(codebooks.shape[0]):
        if compiled:
            codes[:, j] = nearest_codewords(resid, codebooks[j], cnorm[j])[0]
        else:
            codes[:, j] = torch.addmm(cnorm[j], resid, codebooks[j].T, alpha=-2.0).argmin(-1)
        if j + 1 < codebooks.shape[0]:
            resid = resid - F.embedding(codes[:, j], codebooks[j])
    return codes


def _beam_chunk(t: Tensor, codebooks: Tensor, cnorm: Tensor, beam: int) -> Tensor:
    n, d = t.shape
    m, k, _ = codebooks.shape
    # Stage 0: one parent (the empty sum).
    dist0 = torch.addmm(cnorm[0], t, codebooks[0].T, alpha=-2.0)  # ||t - c||^2 - ||t||^2
    err, code = dist0.topk(beam, dim=-1, largest=False)  # [n, b]; slot 0 is greedy
    codes = code.unsqueeze(-1)  # [n, b, 1]
    partial = codebooks[0][code]  # [n, b, d]
    for j in range(1, m):
        resid = t.unsqueeze(1) - partial  # [n, b, d]
        # ||resid - c||^2 = ||resid||^2 - 2 resid.c + ||c||^2
        dist = resid.pow(2).sum(-1, keepdim=True) + cnorm[j] - 2.0 * resid @ codebooks[j].T
        flat = dist.reshape(n, beam * k)
        greedy = dist[:, 0, :].argmin(-1, keepdim=True)  # child of slot 0, in flat index
        if beam > 1:
            masked = flat.scatter(1, greedy, float("inf"))
            rest = masked.topk(beam - 1, dim=-1, largest=False).indices
            pick = torch.cat([greedy, rest], dim=1)
        else:
            pick = greedy
        parent, child = pick // k, pick % k
        codes = torch.cat([codes.gather(1, parent.unsqueeze(-1).expand(-1, -1, j)),
                           child.unsqueeze(-1)], dim=-1)
        partial = partial.gather(1, parent.unsqueeze(-1).expand(-1, -1, d)) + codebooks[j][child]
        err = flat.gather(1, pick)
    best = err.argmin(-1)
    return codes[torch.arange(n, device=t.device), best]


def refine_codes(targets: Tensor, codebooks: Tensor, codes: Tensor, passes: int = 1) -> Tensor:
    """Coordinate descent: re-pick each codebook's code with the others fixed (exact argmin).

    Never increases ``||targets - decode(codes)||``. ``codes [N, M]`` is not modified.
    """
    codes = codes.clone()
    m = codebooks.shape[0]
    if m == 1:
        return codes
    for _ in range(passes):
        total = additive_decode(codebooks, codes)
        for j in range(m):
            own = codebooks[j][codes[:, j]]
            resid = targets - (total - own)
            idx, _ = nearest(resid, codebooks[j])
            total = total - own + codebooks[j][idx]
            codes[:, j] = idx
    return codes
