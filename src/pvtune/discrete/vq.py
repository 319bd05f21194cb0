"""A vector-quantization bottleneck: each latent vector replaced by its nearest codeword.

The forward output is the codeword, the backward pass reaches the encoder straight through
(``z + sg(zq - z)``) or by the rotation trick; the codebook learns by its loss
``||zq - sg(z)||^2`` (plain), by exponential moving averages (EMA), or through VQBridge
(FVQ): the whole codebook passes through a small learned projector whose last layer starts at
zero, so every codeword moves at every step and none goes dead.

Example::

    vq = VectorQuantizer(VQBottleneckConfig(num_codes=1024, dim=16, update="vqbridge"))
    out = vq(z)                  # z [..., 16]
    loss = task_loss + out.loss  # codebook + commitment terms
    vq.usage()                   # distinct codes in the last 65,536 assignments / K
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.estimators import hard_forward

UPDATES = ("plain", "ema", "rotation", "vqbridge")
USAGE_WINDOW = 65_536


@dataclass(frozen=True)
class VQBottleneckConfig:
    """How a :class:`VectorQuantizer` looks up and learns its codebook.

    ``update``: ``plain`` (codebook loss, straight-through), ``ema`` (moving averages of the
    assigned vectors, ``ema_decay``), ``rotation`` (codebook loss; the encoder's gradient
    rotated and scaled from ``z`` onto its codeword, Fifty et al. 2024) or ``vqbridge`` (the
    codebook passed through a projector, FVQ). ``commitment``: weight of
    ``||z - sg(zq)||^2``. ``bridge_group``: codewords merged into one token of the projector;
    ``bridge_hidden`` / ``bridge_blocks``: its width and number of residual MLP blocks.
    ``normalize``: unit-normalise latents and codewords before the lookup (LlamaGen's
    ``codebook_l2_norm``, which FVQ builds on). ``init``: the codebook's starting values,
    ``uniform`` in ``[-1/K, 1/K]`` (VQGAN, LlamaGen) or ``normal`` with std ``1/sqrt(dim)``.
    """

    num_codes: int
    dim: int
    update: str = "plain"
    commitment: float = 0.25
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    bridge_group: int = 1
    bridge_hidden: int = 64
    bridge_blocks: int = 2
    usage_window: int = USAGE_WINDOW
    normalize: bool = False
    init: str = "uniform"

    def __post_init__(self) -> None:
        if self.num_codes < 2 or self.dim < 1:
            raise ConfigError(f"a codebook needs num_codes >= 2 and dim >= 1, got "
                              f"{self.num_codes} x {self.dim}")
        if self.update not in UPDATES:
            raise ConfigError(f"update must be one of {', '.join(UPDATES)}, got "
                              f"{self.update!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must lie in (0, 1), got {self.ema_decay}")
        if self.commitment < 0:
            raise ConfigError(f"commitment must be >= 0, got {self.commitment}")
        if self.update == "vqbridge" and self.num_codes % self.bridge_group:
            raise ConfigError(f"VQBridge groups {self.bridge_group} codewords per token: "
                              f"num_codes {self.num_codes} must be a multiple of it (or set "
                              "bridge_group to a divisor)")
        if self.init not in ("uniform", "normal"):
            raise ConfigError(f"init must be uniform or normal, got {self.init!r}")
        if self.usage_window < 1:
            raise ConfigError(f"usage_window must be >= 1, got {self.usage_window}")


@dataclass
class VQOutput:
    """The bottleneck's result: ``quantized`` (codeword values, gradient to the encoder),
    ``codes`` (indices, the shape of ``z`` without its last axis) and ``loss`` (codebook +
    commitment terms, to add to the task loss)."""

    quantized: Tensor
    codes: Tensor
    loss: Tensor


class VQBridge(nn.Module):
    """FVQ's codebook projector: ``C + f(C)``, where ``f`` merges groups of ``group``
    codewords into one token, mixes tokens with residual MLP blocks and splits them back; the
    last layer starts at zero, so the projector starts as the identity and, after one step,
    moves every codeword (every one whose position within its group some assigned codeword
    shares: with thousands of assignments per step, all of them)."""

    def __init__(self, dim: int, group: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.group = group
        self.norm_in = nn.LayerNorm(group * dim)  # codebooks start tiny: mix their shapes
        self.compress = nn.Linear(group * dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 2 * hidden), nn.GELU(),
                          nn.Linear(2 * hidden, hidden)) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.recover = nn.Linear(hidden, group * dim)
        nn.init.zeros_(self.recover.weight)
        nn.init.zeros_(self.recover.bias)

    def forward(self, codebook: Tensor) -> Tensor:
        """The projected codebook ``[K, dim]``."""
        k, d = codebook.shape
        h = self.compress(self.norm_in(codebook.reshape(k // self.group, self.group * d)))
        for block in self.blocks:
            h = h + block(h)
        return codebook + self.recover(self.norm(h)).reshape(k, d)


def rotate_to(z: Tensor, e: Tensor, eps: float = 1e-6) -> Tensor:
    """The rotation trick: ``e`` in the forward pass; backward, the gradient reaching ``z`` is
    the output's gradient turned by the rotation that takes ``z``'s direction to ``e``'s and
    scaled by ``|e| / |z|`` (both treated as constants)."""
    z_norm = z.norm(dim=-1, keepdim=True).clamp_min(eps)
    e_norm = e.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (z / z_norm).detach()
    q = (e / e_norm).detach()
    w = F.normalize(u + q, dim=-1, eps=eps).detach()
    # R z = z - 2 w (w.z) + 2 q (u.z): reflections through w, then through q
    rotated = (z - 2 * w * (w * z).sum(-1, keepdim=True)
               + 2 * q * (u * z).sum(-1, keepdim=True))
    return hard_forward(e, (e_norm / z_norm).detach() * rotated)


class CodebookUsage:
    """Distinct codes among the last ``window`` assignments, divided by the codebook size."""

    def __init__(self, num_codes: int, window: int = USAGE_WINDOW) -> None:
        self.num_codes = num_codes
        self.window = window
        self._buffer = torch.empty(0, dtype=torch.long)

    def update(self, codes: Tensor) -> None:
        """Record ``codes`` (any shape) as the newest assignments."""
        flat = codes.detach().reshape(-1).to("cpu", torch.long)
        self._buffer = torch.cat([self._buffer, flat])[-self.window:]

    def value(self) -> float:
        """The usage in [0, 1] (0 before any assignment)."""
        if self._buffer.numel() == 0:
            return 0.0
        return torch.unique(self._buffer).numel() / self.num_codes

    def reset(self) -> None:
        """Forget every assignment."""
        self._buffer = torch.empty(0, dtype=torch.long)


class VectorQuantizer(nn.Module):
    """Nearest-codeword bottleneck over the last axis of its input (see the module doc)."""

    def __init__(self, config: VQBottleneckConfig) -> None:
        super().__init__()
        self.config = config
        k, d = config.num_codes, config.dim
        if config.init == "uniform":
            init = torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k)
        else:
            init = torch.randn(k, d) / math.sqrt(d)
        if config.update == "ema":
            self.register_buffer("codebook", init.clone())
            self.register_buffer("ema_count", torch.ones(k))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.bridge = (VQBridge(d, config.bridge_group, config.bridge_hidden,
                                config.bridge_blocks) if config.update == "vqbridge" else None)
        self.tracker = CodebookUsage(k, config.usage_window)

    def effective_codebook(self) -> Tensor:
        """The codewords the lookup uses: the codebook, projected by VQBridge if present
        (and unit-normalised with ``normalize``)."""
        book = self.bridge(self.codebook) if self.bridge is not None else self.codebook
        return F.normalize(book, dim=-1) if self.config.normalize else book

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """Index of each vector's nearest codeword (squared Euclidean distance)."""
        self._check(z)
        z = F.normalize(z, dim=-1) if self.config.normalize else z
        return self._nearest(z.reshape(-1, self.config.dim),
                             self.effective_codebook()).reshape(z.shape[:-1])

    def decode(self, codes: Tensor) -> Tensor:
        """Codeword values of ``codes``."""
        return F.embedding(codes, self.effective_codebook())

    def usage(self) -> float:
        """Codebook usage over the last ``usage_window`` training assignments."""
        return self.tracker.value()

    def forward(self, z: Tensor) -> VQOutput:
        """Quantize ``z`` ``[..., dim]``; in training mode also record usage and, for EMA,
        move the codebook."""
        self._check(z)
        cfg = self.config
        flat = z.reshape(-1, cfg.dim)
        if cfg.normalize:
            flat = F.normalize(flat, dim=-1)
        book = self.effective_codebook()
        codes = self._nearest(flat.detach(), book.detach())
        e = book[codes]
        commit = F.mse_loss(flat, e.detach())
        if cfg.update == "ema":
            loss = cfg.commitment * commit
            if self.training:
                self._ema_step(flat.detach(), codes)
        else:
            loss = F.mse_loss(e, flat.detach()) + cfg.commitment * commit
        if cfg.update == "rotation":
            out = rotate_to(flat, e)
        else:
            out = hard_forward(e, flat)
        if self.training:
            self.tracker.update(codes)
        return VQOutput(out.reshape(z.shape), codes.reshape(z.shape[:-1]), loss)

    def _check(self, z: Tensor) -> None:
        if z.shape[-1] != self.config.dim:
            raise ConfigError(f"the quantizer's codewords have {self.config.dim} values; its "
                              f"input's last axis has {z.shape[-1]}")

    @staticmethod
    def _nearest(flat: Tensor, book: Tensor, entries: int = 1 << 24) -> Tensor:
        book_sq = (book * book).sum(-1)
        chunk = max(1, entries // book.shape[0])  # distance blocks of at most 64 MiB
        out = []
        for part in flat.split(chunk):
            # |x|^2 is the same for every codeword: argmin of |e|^2 - 2 x.e
            out.append(torch.addmm(book_sq, part, book.t(), alpha=-2).argmin(-1))
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=flat.device)

    @torch.no_grad()
    def _ema_step(self, flat: Tensor, codes: Tensor) -> None:
        cfg = self.config
        counts = torch.bincount(codes, minlength=cfg.num_codes).to(flat.dtype)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes, flat)  # (normalised)
        self.ema_count.mul_(cfg.ema_decay).add_(counts, alpha=1 - cfg.ema_decay)
        self.ema_sum.mul_(cfg.ema_decay).add_(sums, alpha=1 - cfg.ema_decay)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + cfg.ema_epsilon) / (n + cfg.num_codes * cfg.ema_epsilon) * n
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(-1))


def learning_annealing(step: int, total: int, warmup: float = 0.05, hold: float = 0.3,
                       final: float = 0.01) -> float:
    """FVQ's learning-rate factor at ``step`` of ``total``: linear warm-up over the first
    ``warmup`` fraction, 1 until ``hold`` of training, then a cosine decay to ``final``."""
    if total < 1:
        raise ConfigError(f"total steps must be >= 1, got {total}")
    if not 0 <= warmup <= hold <= 1:
        raise ConfigError(f"need 0 <= warmup <= hold <= 1, got warmup {warmup}, hold {hold}")
    t = step / total
    if t < warmup:
        return (step + 1) / max(1.0, warmup * total)
    if t <= hold:
        return 1.0
    progress = min(1.0, (t - hold) / max(1e-12, 1 - hold))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


__all__ = ["UPDATES", "USAGE_WINDOW", "CodebookUsage", "VQBottleneckConfig", "VQBridge",
           "VQOutput", "VectorQuantizer", "learning_annealing", "rotate_to"]
