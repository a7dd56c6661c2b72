"""YaRN rotary embeddings as DeepSeek uses them, on the `qk_rope_head_dim` part of queries and keys.

DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ... (`traditional=True` in `mx.fast.rope`) in
MLA; V3.2's lightning indexer rotates the halves (x_i, x_{i+dim/2}) instead (`interleaved=False`).
YaRN changes three things: the per-pair frequencies (interpolated for slow pairs, kept for fast
ones, blended in between), a factor on cos/sin (`mscale / mscale_all_dim`, 1.0 in every published
config), and the softmax scale of attention (`mscale_all_dim`, see `softmax_scale`).
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def inverse_frequencies(dim: int, base: float, scaling: Optional[dict]) -> np.ndarray:
    """Radians per position for each of the dim/2 pairs (float64, computed once)."""
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if scaling is None:
        return inv
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]

    def correction_dim(rotations):  # the pair index that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(scaling.get("beta_fast") or 32)), 0)
    high = min(math.ceil(correction_dim(scaling.get("beta_slow") or 1)), dim - 1)
    if low == high:
        high += 0.001  # as DeepSeek does: avoid a zero-width ramp (Kimi-K2 has beta_fast == beta_slow)
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: fast pairs keep their frequency; 0: slow pairs are interpolated
    return inv / factor * (1 - keep) + inv * keep


def softmax_scale(qk_head_dim: int, scaling: Optional[dict]) -> float:
    scale = qk_head_dim**-0.5
    if scaling and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale


class RoPE(nn.Module):
    """Rotates the `dim` features of (B, heads, L, dim) inputs for positions offset .. offset+L-1:
    interleaved pairs (DeepSeek's MLA), or with `interleaved=False` the two halves (V3.2's indexer)."""

    def __init__(self, dim: int, base: float, scaling: Optional[dict] = None, interleaved: bool = True):
        super().__init__()
        self.dim, self.interleaved = dim, interleaved
        # mx.fast.rope takes periods (positions per radian), the inverse of the frequencies.
        self._periods = mx.array(1.0 / inverse_frequencies(dim, base, scaling), dtype=mx.float32)
        self.cos_sin_scale = 1.0
        if scaling is not None:
            factor = scaling["factor"]
            self.cos_sin_scale = yarn_mscale(factor, scaling.get("mscale", 1.0)) / yarn_mscale(
                factor, scaling.get("mscale_all_dim", 0.0)
            )

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.cos_sin_scale != 1.0:
            x = x * self.cos_sin_scale  # rotation is linear: scaling x equals scaling cos and sin
        return mx.fast.rope(
            x, self.dim, traditional=self.interleaved, base=None, scale=1.0, offset=offset, freqs=self._periods
        )
