from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pvtune.packing import BitCodec, TritCodec, codec_from_dict


@given(bits=st.integers(1, 16), n=st.integers(0, 300), seed=st.integers(0, 1000))
def test_bit_codec_round_trip(bits, n, seed):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(seed))
    codec = BitCodec(bits)
    packed = codec.pack(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (n * bits + 7) // 8
    assert torch.equal(codec.unpack(packed, n), codes)


def test_bit_codec_chunk_boundary():
    n = BitCodec._CHUNK + 13
    codes = torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(BitCodec(3).unpack(BitCodec(3).pack(codes), n), codes)


@given(n=st.integers(0, 200), seed=st.integers(0, 1000))
def test_trit_codec_round_trip(n, seed):
    codes = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))
    packed = TritCodec().pack(codes)
    assert packed.numel() == (n + 4) // 5
    assert torch.equal(TritCodec().unpack(packed, n), codes)


def test_out_of_range_and_truncated():
    with pytest.raises(ValueError, match="out of range for 2-bit"):
        BitCodec(2).pack(torch.tensor([4]))
    with pytest.raises(ValueError, match="ternary codes"):
        TritCodec().pack(torch.tensor([3]))
    packed = BitCodec(4).pack(torch.arange(16))
    with pytest.raises(ValueError, match="truncated or corrupted"):
        BitCodec(4).unpack(packed[:-1], 16)


def test_codec_dicts():
    assert codec_from_dict(BitCodec(5).to_dict()) == BitCodec(5)
    assert codec_from_dict(TritCodec().to_dict()) == TritCodec()
    with pytest.raises(ValueError, match="unknown or malformed"):
        codec_from_dict({"codec": "zip"})
