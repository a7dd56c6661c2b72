"""DeepSeek's block-FP8 weights (V3, R1, V3.1): float8_e4m3fn values with one float32
`weight_scale_inv` per 128x128 block, edge blocks partial; value = fp8 * scale_inv."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx

from mlx_deepseek.layout import CheckpointError


def block_size(config: dict, folder: Path):
    """(rows, cols) of a scale block if config.json announces DeepSeek FP8, else None."""
    q = config.get("quantization_config")
    if not q:
        return None
    where = f"{folder / 'config.json'}: quantization_config"
    if q.get("quant_method") != "fp8":
        raise CheckpointError(f"{where}: quant_method {q.get('quant_method')!r} is not supported (only DeepSeek's 'fp8')")
    if q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{where}: fmt {q.get('fmt')!r} is not supported (only 'e4m3')")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}: weight_block_size {block!r} is not supported (expected [rows, cols])")
    return tuple(block)


def check_scales(tensors: dict, block) -> dict[str, str]:
    """FP8 weight name -> its scale's name; every FP8 weight needs a scale of the right shape."""
    pairs = {}
    for name, info in tensors.items():
        if info.dtype != "F8_E4M3":
            continue
        scale = name + "_scale_inv"
        if scale not in tensors:
            raise CheckpointError(f"{info.file}: FP8 tensor {name} has no {scale}")
        rows, cols = info.shape
        expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        if tuple(tensors[scale].shape) != expected:
            raise CheckpointError(
                f"{tensors[scale].file}: tensor {scale} has shape {tuple(tensors[scale].shape)}, expected {expected} "
                f"(one scale per {block[0]}x{block[1]} block of {name} {info.shape})"
            )
        pairs[name] = scale
    return pairs


def dequantize(weight: mx.array, scale_inv: mx.array, block) -> mx.array:
    """float32 weight from fp8 bytes (uint8) and per-block scales; partial edge blocks are cropped."""
    rows, cols = weight.shape
    w = mx.from_fp8(weight, dtype=mx.float32)
    scale = mx.repeat(mx.repeat(scale_inv.astype(mx.float32), block[0], axis=0), block[1], axis=1)
    return w * scale[:rows, :cols]
