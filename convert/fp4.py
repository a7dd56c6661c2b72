"""DeepSeek-V4's FP4 routed experts, and why they are MLX's `mxfp4` as they are.

As published (DeepSeek's inference/convert.py and model.py): `X.weight` is I8 [out, in/2], two
e2m1 codes per byte, the LOW nibble the even column (element 2i) and the high nibble element
2i + 1; `X.scale` is e8m0 [out, in/32], one power of two per 32 consecutive columns:
    value[r, c] = E2M1[code(r, c)] * 2^(scale[r, c // 32] - 127),
    E2M1 = 0, 0.5, 1, 1.5, 2, 3, 4, 6 for codes 0-7 and their negatives for 8-15 (bit 3 = sign).

MLX's mxfp4 (mx.quantize(w, 32, 4, mode="mxfp4")) stores a row as uint32 words holding 8 codes
each, element j of a word in bits 4j..4j+3 (checked in tests/test_convert_v4.py), the same e2m1
code table, and one uint8 e8m0 scale per group of 32 along the row. Read as little-endian uint32,
DeepSeek's bytes ARE those words (byte k of a word holds elements 2k and 2k+1, low nibble first)
and its scales ARE MLX's scales: the experts are carried over byte for byte, nothing is
requantized, and MLX dequantizes them to exactly the values above.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_deepseek.layout import CheckpointError

from .fp8 import E8M0_SCALES, decode_scale, scale_name

PACKED_DTYPES = ("I8", "U8")
GROUP = 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def check_scales(tensors: dict) -> dict[str, str]:
    """FP4 weight name -> its e8m0 scale: every I8/U8 weight with a `.scale` beside it, checked."""
    pairs = {}
    for name, info in tensors.items():
        if info.dtype == "F8_E4M3":
            continue
        scale = scale_name(name, tensors) if name.endswith(".weight") else None
        if scale is None:
            continue
        s = tensors[scale]
        if info.dtype not in PACKED_DTYPES:
            if info.dtype in ("F32", "BF16", "F16"):
                continue  # a float weight with a scale beside it: not ours to pair (checked as a float)
            raise CheckpointError(
                f"{info.file}: tensor {name} has a scale ({scale}) but dtype {info.dtype}; quantized V4 weights "
                "are F8_E4M3 (FP8) or I8 with two e2m1 (FP4) values per byte")
        if s.dtype not in E8M0_SCALES:
            raise CheckpointError(f"{s.file}: FP4 scale {scale} has dtype {s.dtype}; expected e8m0 (F8_E8M0)")
        if len(info.shape) != 2:
            raise CheckpointError(f"{info.file}: FP4 tensor {name} has shape {info.shape}; expected 2-D "
                                  "[out, in/2] (two e2m1 values per byte)")
        rows, packed = info.shape
        expected = (rows, packed * 2 // GROUP)
        if packed * 2 % GROUP or tuple(s.shape) != expected:
            raise CheckpointError(
                f"{s.file}: e8m0 scale {scale} has shape {tuple(s.shape)}, expected {expected} (one scale per "
                f"{GROUP} values of {name}, packed {info.shape} = [out, in/2] with in = {packed * 2})")
        pairs[name] = scale
    return pairs


def logical_shape(packed_shape: tuple) -> tuple:
    return (packed_shape[0], packed_shape[1] * 2)


def dequantize(packed: mx.array, scale: mx.array) -> mx.array:
    """float32 [out, in] from the packed bytes (uint8 [out, in/2]) and e8m0 scales (uint8 [out, in/32])."""
    rows, half = packed.shape
    table = mx.array(E2M1, dtype=mx.float32)
    low, high = packed & 0x0F, packed >> 4
    values = mx.stack([table[low], table[high]], axis=-1).reshape(rows, half * 2)
    s = mx.repeat(decode_scale(scale, "F8_E8M0"), GROUP, axis=1)
    return values * s


def as_mxfp4(packed: mx.array, scale: mx.array) -> tuple[mx.array, mx.array]:
    """MLX's mxfp4 (weight uint32 [out, in/8], scales uint8 [out, in/32]) from DeepSeek's bytes: a view."""
    return packed.view(mx.uint32), scale
