"""The lightning indexer of DeepSeek Sparse Attention (DeepSeek-V3.2): which cached tokens each query reads.

Per layer, beside MLA, with its own small projections (DeepSeek's `inference/model.py`, `Indexer`):

    q_h = wq_b(qr)              qr: MLA's normed query latent; index_n_heads heads of index_head_dim
    k   = LayerNorm(wk(x))      one key per token shared by all heads (weight and bias), cached
    RoPE on the FIRST qk_rope_head_dim features of q and k, rotating HALVES (x_i, x_{i+d/2}), not the
         interleaved pairs of MLA's RoPE on its last features (mixing these up was mlx-lm #1431)
    w_h = weights_proj(x) * index_n_heads^-0.5                                  (float32)
    I[t, s] = sum_h w_h * index_head_dim^-0.5 * ReLU(q_h . k_s)                 (float32)

and query t reads the `min(index_topk, t + 1)` visible tokens of highest I[t, .].

DeepSeek's kernels also rotate q and k by a Hadamard matrix and round them to FP8 before the product:
the rotation is orthogonal (it leaves every q . k as is) and the rounding is a deployment detail, so
we do neither and compute the exact scores in float32, as transformers does. transformers scales
inside the ReLU and DeepSeek outside it; the scale is positive, so the two are the same number.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .rope import RoPE


class Indexer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.heads, self.dim, self.topk = args.index_n_heads, args.index_head_dim, args.index_topk
        self.rope_dim = args.qk_rope_head_dim
        self.wq_b = nn.Linear(args.q_lora_rank, self.heads * self.dim, bias=False)
        self.wk = nn.Linear(args.hidden_size, self.dim, bias=False)
        self.k_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.weights_proj = nn.Linear(args.hidden_size, self.heads, bias=False)
        self.rope = RoPE(self.rope_dim, args.rope_theta, args.rope_scaling, interleaved=False)

    def _rotate(self, x: mx.array, offset) -> mx.array:
        """RoPE (halves) on the first rope_dim features of (B, heads, L, dim)."""
        pe, rest = mx.split(x, [self.rope_dim], axis=-1)
        return mx.concatenate([self.rope(pe, offset), rest], axis=-1)

    def key(self, x: mx.array, offset) -> mx.array:
        """(B, L, D) -> the keys the cache holds, (B, 1, L, index_head_dim)."""
        k = self.k_norm(self.wk(x).astype(mx.float32)).astype(x.dtype)  # LayerNorm in float32, as DeepSeek's
        return self._rotate(k[:, None], offset)

    def queries(self, x: mx.array, qr: mx.array, offset) -> tuple[mx.array, mx.array]:
        """(B, L, D) input and (B, L, q_lora_rank) query latent -> the rotated queries (B, L, heads, dim)
        and the head weights (B, L, 1, heads), float32, with both scales folded in."""
        B, L, _ = x.shape
        q = self.wq_b(qr).reshape(B, L, self.heads, self.dim).transpose(0, 2, 1, 3)
        q = self._rotate(q, offset).transpose(0, 2, 1, 3)
        w = self.weights_proj(x).astype(mx.float32) * (self.heads**-0.5 * self.dim**-0.5)
        return q, w[:, :, None, :]

    def scores(self, q: mx.array, w: mx.array, keys: mx.array) -> mx.array:
        """I[t, s] for queries (B, L, heads, dim) against keys (B, 1, T, dim): (B, L, T), float32.
        Both sums are matmuls (the head sum too: no long reduction, cf. mlx #3784)."""
        logits = mx.maximum(q.astype(mx.float32) @ keys.astype(mx.float32).swapaxes(-1, -2), 0.0)  # (B, L, H, T)
        return (w @ logits)[:, :, 0]

    def select(self, scores: mx.array, first) -> tuple[mx.array, mx.array]:
        """The top-k keys of each query row, for queries at positions first, first + 1, ... (`first`
        an int, or one per batch row (B,) when a batch of right-padded sequences decodes together):
        (B, L, k) indices (in no particular order) and whether each is visible (causal, and not
        padding). A row that sees fewer than k keys gets all of them, padded with invisible ones."""
        L, T = scores.shape[-2:]
        k = min(self.topk, T)
        positions = (first[:, None] if isinstance(first, mx.array) else first) + mx.arange(L)[None]  # (B|1, L)
        scores = mx.where(mx.arange(T) <= positions[..., None], scores, -mx.inf)
        chosen = mx.argpartition(-scores, kth=k - 1, axis=-1)[..., :k]
        return chosen, chosen <= positions[..., None]
