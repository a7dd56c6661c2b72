"""Manifold-constrained hyper-connections (mHC): DeepSeek-V4's residual of `hc_mult` streams.

Each token carries N = hc_mult copies of the hidden state, (B, L, N, D). Around every attention
and feed-forward block, one small projection of the RMS-normalized, flattened streams gives
- pre  (N):    sigmoid(.) + eps, collapses the streams into the block's input: sum_i pre_i x_i;
- post (N):    2 sigmoid(.), spreads the block's output back over the streams;
- comb (N, N): softmax, then Sinkhorn-Knopp towards a doubly stochastic matrix, mixes the streams:
  new_k = post_k * out + sum_j comb[j, k] x_j.
The head collapses the streams once more with its own `pre` (HyperHead). All of it in float32.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def flat_rms(x: mx.array, eps: float) -> mx.array:
    """(B, L, N, D) -> (B, L, N*D) float32, each row divided by its root mean square."""
    flat = x.reshape(*x.shape[:-2], -1).astype(mx.float32)
    return flat * mx.rsqrt(mx.mean(flat * flat, axis=-1, keepdims=True) + eps)


def sinkhorn(logits: mx.array, iters: int, eps: float) -> mx.array:
    """(.., N, N) -> softmax over the last axis, then alternate column and row normalizations."""
    comb = mx.softmax(logits, axis=-1) + eps
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(axis=-1, keepdims=True) + eps)
        comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)
    return comb


class HyperConnection(nn.Module):
    def __init__(self, dims: int, streams: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.streams, self.iters, self.hc_eps, self.norm_eps = streams, sinkhorn_iters, hc_eps, norm_eps
        width = (2 + streams) * streams
        self.fn = mx.zeros((width, streams * dims), dtype=mx.float32)
        self.base = mx.zeros((width,), dtype=mx.float32)
        self.scale = mx.ones((3,), dtype=mx.float32)

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """x (B, L, N, D) -> the block's input (B, L, D), post (B, L, N), comb (B, L, N, N)."""
        n = self.streams
        mixes = flat_rms(x, self.norm_eps) @ self.fn.T
        pre = mx.sigmoid(mixes[..., :n] * self.scale[0] + self.base[:n]) + self.hc_eps
        post = 2 * mx.sigmoid(mixes[..., n : 2 * n] * self.scale[1] + self.base[n : 2 * n])
        comb_logits = mixes[..., 2 * n :] * self.scale[2] + self.base[2 * n :]
        comb = sinkhorn(comb_logits.reshape(*comb_logits.shape[:-1], n, n), self.iters, self.hc_eps)
        collapsed = (pre[..., None] * x.astype(mx.float32)).sum(axis=-2)
        return collapsed.astype(x.dtype), post, comb

    @staticmethod
    def expand(out: mx.array, residual: mx.array, post: mx.array, comb: mx.array) -> mx.array:
        """The block's output (B, L, D) and the streams it read (B, L, N, D) -> the new streams."""
        dtype = residual.dtype
        mixed = comb.astype(dtype).swapaxes(-1, -2) @ residual  # new_k = sum_j comb[j, k] x_j
        return post.astype(dtype)[..., None] * out[..., None, :] + mixed


class HyperHead(nn.Module):
    """The last collapse of the streams, before the final norm and the LM head."""

    def __init__(self, dims: int, streams: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = mx.zeros((streams, streams * dims), dtype=mx.float32)
        self.base = mx.zeros((streams,), dtype=mx.float32)
        self.scale = mx.ones((1,), dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        pre = mx.sigmoid((flat_rms(x, self.norm_eps) @ self.fn.T) * self.scale + self.base) + self.hc_eps
        return (pre[..., None] * x.astype(mx.float32)).sum(axis=-2).astype(x.dtype)
