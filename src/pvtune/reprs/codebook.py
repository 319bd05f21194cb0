"""Codebook representations: single-codebook VQ and additive multi-codebook (AQLM layout)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pvtune.errors import ConfigError
from pvtune.packing import BitCodec, IntCodec
from pvtune.reprs.base import (
    QuantizedWeight,
    ReprConfig,
    ceil_log2,
    check_group_divides,
    check_int,
    check_range,
    register_representation,
    round_to_fp16,
)
from pvtune.reprs.codebook_search import (
    additive_decode,
    beam_search,
    kmeans,
    nearest,
    refine_codes,
)
from pvtune.reprs.uniform import FP16_TINY


def _code_dtype(bits: int) -> torch.dtype:
    if bits <= 8:
        return torch.uint8
    return torch.int16 if bits <= 15 else torch.int32


def _check_codewords(config: ReprConfig, field: str, k: int, out: int, inp: int, g: int) -> None:
    groups = out * (inp // g)
    if k > groups:
        raise ConfigError(
            f"{type(config).__name__}.{field}: {k} codewords exceed the {groups} weight groups of "
            f"a {out}x{inp} layer with group length {g}; allowed range [2, {groups}]. "
            "Use fewer codewords (or fewer bits per codebook) for small layers"
        )


@dataclass(frozen=True)
class VQConfig(ReprConfig):
    """One codebook of ``num_codewords`` fp16 vectors of ``group_size`` input weights.

    Bits/param = ``(N/g * ceil(log2 K) + K * g * 16) / N`` for a matrix of N weights.
    """

    num_codewords: int = 256
    group_size: int = 8
    kmeans_iters: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("num_codewords", "group_size", "kmeans_iters", "seed"):
            check_int(self, f, getattr(self, f))
        check_range(self, "num_codewords", self.num_codewords, 2, 1 << 16)
        check_range(self, "group_size", self.group_size, 1, None)
        check_range(self, "kmeans_iters", self.kmeans_iters, 0, None)

    def check_shape(self, out_features: int, in_features: int) -> None:
        check_group_divides(self, "group_size", self.group_size, in_features)
        _check_codewords(
            self, "num_codewords", self.num_codewords, out_features, in_features, self.group_size
        )


@register_representation("vq")
class VQWeight(QuantizedWeight):
    """``W[o, g*j : g*(j+1)] = codebook[codes[o, j]]``; k-means initialisation."""

    config_cls = VQConfig

    def __init__(self, out_features: int, in_features: int, config: VQConfig) -> None:
        super().__init__(out_features, in_features, config)
        self.bits = ceil_log2(config.num_codewords)
        ngroups = in_features // config.group_size
        self.register_buffer(
            "codes", torch.zeros(out_features, ngroups, dtype=_code_dtype(self.bits))
        )
        self.codebook = nn.Parameter(torch.zeros(config.num_codewords, config.group_size))

    @property
    def code_group_size(self) -> int:
        return self.config.group_size

    def _vectors(self, w: Tensor) -> Tensor:
        return w.reshape(-1, self.config.group_size)

    def init_from_dense(self, weight: Tensor) -> None:
        gen = torch.Generator().manual_seed(self.config.seed)
        vectors = self._vectors(weight)
        centroids = kmeans(vectors, self.config.num_codewords, self.config.kmeans_iters, gen)
        with torch.no_grad():
            self.codebook.copy_(round_to_fp16(centroids))
            idx, _ = nearest(vectors, self.codebook)
            self.codes.copy_(idx.view(self.codes.shape).to(self.codes.dtype))

    def forward(self) -> Tensor:
        return self.codebook[self.codes.long()].reshape(self.out_features, self.in_features)

    def encode(
        self, target: Tensor, groups: Tensor | None = None, beam_size: int | None = None
    ) -> None:
        target, groups = self._check_inputs(target, groups, beam_size)
        with torch.no_grad():
            vectors = self._vectors(target)
            index = None if groups is None else groups.reshape(-1).nonzero().squeeze(1)
            self._encode_at(index, vectors if index is None else vectors[index])

    def encode_groups(self, index: Tensor, values: Tensor,
                      beam_size: int | None = None) -> None:
        """Only the selected groups' vectors are searched (no full-size target)."""
        self._check_beam_size(beam_size)
        values = self._check_group_values(index, values)
        with torch.no_grad():
            self._encode_at(index, values)

    def _encode_at(self, index: Tensor | None, vectors: Tensor) -> None:
        """Nearest codeword of each vector for the groups at flat ``index`` (None: all); a
        group keeps its old code unless the new one is strictly closer."""
        codes = self.codes.view(-1)
        old = codes.long() if index is None else codes[index].long()
        book = self.codebook.detach()
        idx, _ = nearest(vectors, book)
        better = (book[idx] - vectors).pow(2).sum(-1) < (book[old] - vectors).pow(2).sum(-1)
        idx = torch.where(better, idx, old).to(codes.dtype)
        if index is None:
            codes.copy_(idx)
        else:
            codes[index] = idx

    def step_unit(self) -> Tensor:
        """The RMS of the codebook's entries (one unit for the whole matrix)."""
        with torch.no_grad():
            return self.codebook.pow(2).mean().sqrt().view(1, 1)

    def bits_per_param(self) -> float:
        n = self.out_features * self.in_features
        c = self.config
        return (n / c.group_size * self.bits + c.num_codewords * c.group_size * 16) / n

    def integer_codecs(self) -> dict[str, IntCodec]:
        return {"codes": BitCodec(self.bits)}


_PRESET = re.compile(r"^(\d+)x(\d+)g(\d+)$")


@dataclass(frozen=True)
class AQLMConfig(ReprConfig):
    """Additive multi-codebook quantization in the AQLM layout.

    ``num_codebooks`` (M) codebooks of ``2^nbits_per_codebook`` (2^B) fp16 vectors of
    ``in_group_size`` (g) input weights; one fp16 scale per output row. Bits/param =
    ``(N/g * M * B + M * 2^B * g * 16 + out * 16) / N``. Presets: :meth:`preset`.
    ``beam_size`` is the beam width used by :meth:`AdditiveWeight.encode`.
    """

    num_codebooks: int = 2
    nbits_per_codebook: int = 8
    in_group_size: int = 8
    beam_size: int = 4
    kmeans_iters: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("num_codebooks", "nbits_per_codebook", "in_group_size", "beam_size",
                  "kmeans_iters", "seed"):
            check_int(self, f, getattr(self, f))
        check_range(self, "num_codebooks", self.num_codebooks, 1, 16)
        check_range(self, "nbits_per_codebook", self.nbits_per_codebook, 1, 16)
        check_range(self, "in_group_size", self.in_group_size, 1, None)
        check_range(self, "beam_size", self.beam_size, 1, 64)
        check_range(self, "kmeans_iters", self.kmeans_iters, 0, None)

    @classmethod
    def preset(cls, name: str, **overrides) -> AQLMConfig:
        """Config from a name like ``"2x8g8"`` (M codebooks x B bits, group g)."""
        match = _PRESET.match(name)
        if not match:
            raise ConfigError(
                f"AQLM preset {name!r} is not of the form MxBgG, e.g. '2x8g8', '1x8g8', '1x16g8'"
            )
        m, b, g = map(int, match.groups())
        return cls(num_codebooks=m, nbits_per_codebook=b, in_group_size=g, **overrides)

    @property
    def name(self) -> str:
        """The preset-style name, e.g. ``2x8g8``."""
        return f"{self.num_codebooks}x{self.nbits_per_codebook}g{self.in_group_size}"

    def check_shape(self, out_features: int, in_features: int) -> None:
        check_group_divides(self, "in_group_size", self.in_group_size, in_features)
        _check_codewords(self, "nbits_per_codebook", 1 << self.nbits_per_codebook,
                         out_features, in_features, self.in_group_size)


@register_representation("aqlm")
class AdditiveWeight(QuantizedWeight):
    """``W[o, g*j : g*(j+1)] = scales[o] * sum_m codebooks[m, codes[o, j, m]]``.

    Tensors follow AQLM: ``codebooks [M, 2^B, 1, g]``, ``codes [out, in/g, M]``,
    ``scales [out, 1, 1, 1]``.
    """

    config_cls = AQLMConfig

    def __init__(self, out_features: int, in_features: int, config: AQLMConfig) -> None:
        super().__init__(out_features, in_features, config)
        m, b, g = config.num_codebooks, config.nbits_per_codebook, config.in_group_size
        self.register_buffer(
            "codes", torch.zeros(out_features, in_features // g, m, dtype=_code_dtype(b))
        )
        self.codebooks = nn.Parameter(torch.zeros(m, 1 << b, 1, g))
        self.scales = nn.Parameter(torch.ones(out_features, 1, 1, 1))

    @property
    def code_group_size(self) -> int:
        return self.config.in_group_size

    def books(self) -> Tensor:
        """The codebooks as ``[M, K, g]`` (codebook, codeword, weights of one group)."""
        return self.codebooks[:, :, 0, :]  # [M, K, g]

    def lut_matmul(self, x: Tensor) -> Tensor | None:
        """``x @ W.T`` by the lookup-table kernel (8-bit codebooks, float32 on the CPU;
        :mod:`pvtune.kernels.lut`); None otherwise."""
        if x.dtype != torch.float32 or not x.is_cpu or self.config.nbits_per_codebook != 8:
            return None
        # the kernel's layout is rebuilt only when a tensor changes (in-place updates bump
        # its version; .to() or load_state_dict swap its storage); the attribute lookups go
        # straight to the module's dicts: this runs once per layer per decoded token
        codes, books = self._buffers["codes"], self._parameters["codebooks"]
        scales = self._parameters["scales"]
        key = (codes._version, books._version, scales._version, codes.data_ptr(),
               books.data_ptr(), scales.data_ptr())
        cached = self.__dict__.get("_lut_operands")
        if cached is None or cached[0] != key:
            from pvtune.kernels.lut import AdditiveLUTOperands, lut_available

            if not codes.is_cpu or not lut_available():
                return None
            cached = (key, AdditiveLUTOperands.from_weight(codes, books, scales))
            self.__dict__["_lut_operands"] = cached
        return cached[1].matmul(x)

    def _unit_vectors(self, w: Tensor) -> Tensor:
        """``w / scale`` as ``[out * in/g, g]`` vectors."""
        scale = self.scales.detach().reshape(-1, 1)
        return (w / scale).reshape(-1, self.config.in_group_size)

    def init_from_dense(self, weight: Tensor) -> None:
        """Per-row RMS scales, residual k-means codebooks, then beam-search codes."""
        c = self.config
        gen = torch.Generator().manual_seed(c.seed)
        rms = weight.pow(2).mean(-1).sqrt().clamp(min=FP16_TINY)
        with torch.no_grad():
            self.scales.copy_(round_to_fp16(rms).view_as(self.scales))
        resid = self._unit_vectors(weight)
        books = []
        for _ in range(c.num_codebooks):
            centroids = kmeans(resid, 1 << c.nbits_per_codebook, c.kmeans_iters, gen)
            idx, _ = nearest(resid, centroids)
            resid = resid - centroids[idx]
            books.append(centroids)
        with torch.no_grad():
            self.codebooks.copy_(round_to_fp16(torch.stack(books)).unsqueeze(2))
            vectors = self._unit_vectors(weight)
            codes = beam_search(vectors, self.books(), c.beam_size)
            codes = refine_codes(vectors, self.books(), codes)
            self.codes.copy_(codes.view(self.codes.shape).to(self.codes.dtype))

    def forward(self) -> Tensor:
        dense = additive_decode(self.books(), self.codes)  # [out, in/g, g]
        return (self.scales.view(-1, 1, 1) * dense).reshape(self.out_features, self.in_features)

    def _group_scales(self, index: Tensor) -> Tensor:
        """The row scale of each group at flat ``index``, ``[len(index), 1]``."""
        rows = index // (self.in_features // self.config.in_group_size)
        return self.scales.detach().view(-1, 1)[rows]

    def decode_groups(self, index: Tensor) -> Tensor:
        with torch.no_grad():
            codes = self.codes.view(-1, self.config.num_codebooks)[index]
            return self._group_scales(index) * additive_decode(self.books(), codes)

    def encode(
        self, target: Tensor, groups: Tensor | None = None, beam_size: int | None = None
    ) -> None:
        """Beam search (then one coordinate-descent pass) on ``target / scale``; a group keeps
        its old codes when the search does not improve on them."""
        target, groups = self._check_inputs(target, groups, beam_size)
        with torch.no_grad():
            if groups is None:
                self._encode_at(None, self._unit_vectors(target), beam_size)
            else:  # only the selected groups: no full-size work
                sel = groups.reshape(-1).nonzero().squeeze(1)
                values = target.reshape(-1, self.config.in_group_size)[sel]
                self._encode_at(sel, values / self._group_scales(sel), beam_size)

    def encode_groups(self, index: Tensor, values: Tensor,
                      beam_size: int | None = None) -> None:
        """Only the selected groups are searched (no full-size target or decode)."""
        self._check_beam_size(beam_size)
        values = self._check_group_values(index, values)
        with torch.no_grad():
            self._encode_at(index, values / self._group_scales(index), beam_size)

    def _encode_at(self, index: Tensor | None, vectors: Tensor, beam_size: int | None) -> None:
        """Search codes for the unit-scale ``vectors`` of the groups at flat ``index``
        (None: every group); a group keeps its old codes unless the new ones are closer."""
        beam = self.config.beam_size if beam_size is None else beam_size
        books = self.books().detach()
        flat = self.codes.view(-1, self.config.num_codebooks)
        old = flat.long() if index is None else flat[index].long()
        new = refine_codes(vectors, books, beam_search(vectors, books, beam))
        new_err = (additive_decode(books, new) - vectors).pow(2).sum(-1)
        old_err = (additive_decode(books, old) - vectors).pow(2).sum(-1)
        best = torch.where((new_err < old_err).unsqueeze(-1), new, old).to(flat.dtype)
        if index is None:
            flat.copy_(best)
        else:
            flat[index] = best

    def step_unit(self) -> Tensor:
        """Each row's scale (``|scales[o]|``): the codebooks are shared, the scale sizes a
        row's cells."""
        with torch.no_grad():
            return self.scales.abs().view(-1, 1)

    def bits_per_param(self) -> float:
        c = self.config
        n = self.out_features * self.in_features
        m, b, g = c.num_codebooks, c.nbits_per_codebook, c.in_group_size
        return (n / g * m * b + m * (1 << b) * g * 16 + self.out_features * 16) / n

    def integer_codecs(self) -> dict[str, IntCodec]:
        return {"codes": BitCodec(self.config.nbits_per_codebook)}
