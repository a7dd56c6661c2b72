"""DeepSeek-V4's RoPE: interleaved pairs on the LAST `dim` features of each head.

Sliding-window-only layers (and the MTP block) rotate with `rope_theta` and no scaling; compressed
layers, their compressors and indexers with `compress_rope_theta` and YaRN frequencies, without
YaRN's cos/sin factor (V4 has no mscale). The same rotation with negated angles undoes it: V4 uses
that on the attention output, whose values carried the keys' rotation.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..rope import inverse_frequencies


class PartialRoPE(nn.Module):
    def __init__(self, dim: int, base: float, scaling: Optional[dict] = None):
        super().__init__()
        self.dim = dim
        # mx.fast.rope takes periods (positions per radian), the inverse of the frequencies.
        self._periods = mx.array(1.0 / inverse_frequencies(dim, base, scaling), dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int = 0, stride: int = 1, inverse: bool = False) -> mx.array:
        """x (B, *, L, D): rotate x[..., -dim:] of row i by the angles of position stride * (offset + i)."""
        scale = -float(stride) if inverse else float(stride)
        rotated = mx.fast.rope(x[..., -self.dim:], self.dim, traditional=True, base=None, scale=scale,
                               offset=offset, freqs=self._periods)
        if x.shape[-1] == self.dim:
            return rotated
        return mx.concatenate([x[..., : -self.dim], rotated.astype(x.dtype)], axis=-1)
