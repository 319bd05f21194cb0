"""Checkpoints: bit-packed integer codes and exact continuous tensors in safetensors."""

from pvtune.checkpoint.format import (
    CheckpointError,
    load_quantized,
    read_layout,
    save_quantized,
)
from pvtune.packing import BitCodec, IntCodec, TritCodec, codec_from_dict

__all__ = [
    "BitCodec",
    "CheckpointError",
    "IntCodec",
    "TritCodec",
    "codec_from_dict",
    "load_quantized",
    "read_layout",
    "save_quantized",
]
