"""DeepSeek's block-FP8 weights: float8_e4m3fn values with one scale per 128x128 block, edge
blocks partial; value = fp8 * scale.

Two scale formats, one dequantization:
- V3 / R1 / V3.1 / V3.2: `X.weight_scale_inv`, float32;
- V4: `X.scale`, e8m0 (safetensors `F8_E8M0`: one byte, the value 2^(byte - 127), no mantissa).
The format is read from the scale tensor's dtype in the file, not guessed from its name.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx

from mlx_deepseek.layout import CheckpointError

FLOAT_SCALES = ("F32", "BF16", "F16")
E8M0_SCALES = ("F8_E8M0", "U8")  # e8m0 bytes (some writers label them U8)


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


def scale_name(name: str, tensors: dict):
    """The scale of a quantized weight: `X.weight_scale_inv` (V3) or `X.scale` (V4), if present."""
    candidates = [name + "_scale_inv"]
    if name.endswith(".weight"):
        candidates.append(name[: -len("weight")] + "scale")
    return next((c for c in candidates if c in tensors), None)


def check_scales(tensors: dict, block) -> dict[str, str]:
    """FP8 weight name -> its scale's name; every FP8 weight needs a scale of the right shape and dtype."""
    pairs = {}
    for name, info in tensors.items():
        if info.dtype != "F8_E4M3":
            continue
        scale = scale_name(name, tensors)
        if scale is None:
            raise CheckpointError(f"{info.file}: FP8 tensor {name} has no {name}_scale_inv (V3) or "
                                  f"{name[: -len('weight')]}scale (V4)")
        if len(info.shape) != 2:
            raise CheckpointError(f"{info.file}: FP8 tensor {name} has shape {info.shape}; block-FP8 weights are 2-D")
        rows, cols = info.shape
        expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        if tuple(tensors[scale].shape) != expected:
            raise CheckpointError(
                f"{tensors[scale].file}: tensor {scale} has shape {tuple(tensors[scale].shape)}, expected {expected} "
                f"(one scale per {block[0]}x{block[1]} block of {name} {info.shape})"
            )
        if tensors[scale].dtype not in FLOAT_SCALES + E8M0_SCALES:
            raise CheckpointError(f"{tensors[scale].file}: scale {scale} has dtype {tensors[scale].dtype}; "
                                  f"expected float32 (weight_scale_inv) or e8m0 (F8_E8M0)")
        pairs[name] = scale
    return pairs


def decode_scale(scale: mx.array, fmt: str) -> mx.array:
    """float32 scales from their stored form: float as is; e8m0 byte b -> 2^(b - 127) exactly
    (b = 0 is the subnormal 2^-127, b = 255 is NaN)."""
    if fmt in FLOAT_SCALES:
        return scale.astype(mx.float32)
    b = scale.astype(mx.uint32)
    value = (b << 23).view(mx.float32)  # exponent field b, mantissa 0
    value = mx.where(b == 0, mx.array(2.0**-127, mx.float32), value)
    return mx.where(b == 255, mx.array(float("nan"), mx.float32), value)


def dequantize(weight: mx.array, scale: mx.array, block, scale_fmt: str = "F32") -> mx.array:
    """float32 weight from fp8 bytes (uint8) and per-block scales; partial edge blocks are cropped."""
    rows, cols = weight.shape
    w = mx.from_fp8(weight, dtype=mx.float32)
    s = decode_scale(scale, scale_fmt)
    s = mx.repeat(mx.repeat(s, block[0], axis=0), block[1], axis=1)
    return w * s[:rows, :cols]
