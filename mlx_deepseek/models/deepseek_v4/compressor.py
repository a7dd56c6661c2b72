"""Compressed keys of DeepSeek-V4: gated pooling of `ratio` tokens into one entry, and CSA's indexer.

A compressor projects each token to values `wkv x` and gate scores `wgate x` (float32), adds a
learned bias per position in the window (`ape`), and pools every complete window of `ratio`
tokens into one entry: sum_j softmax_j(gate + ape) * kv_j per channel, RMS-normalized, its last
rope dims rotated at the window's START position. An entry exists only once its window is
complete; a query at position t sees entries w < (t + 1) // ratio.

With ratio 4 (CSA) windows overlap: projections are twice as wide, the second half pools the
window itself and the first half the window before it, so each entry covers 8 tokens.

CSA's lightning indexer has a ratio-4 compressor of its own (index_head_dim wide) and scores each
visible entry for each query: I[t, s] = sum_h w_h(x_t) ReLU(q_h(t) . k_s) / sqrt(index_head_dim),
w = weights_proj(x) / sqrt(index_n_heads); each query attends to the `index_topk` best entries.
DeepSeek's own code also rotates q and k by a Hadamard matrix (it leaves q . k unchanged) and
rounds them to FP4 as in training; like transformers we compute the exact scores.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import CompressorState
from .rope import PartialRoPE


class Compressor(nn.Module):
    def __init__(self, dims: int, width: int, ratio: int, eps: float):
        super().__init__()
        self.ratio, self.width, self.overlap = ratio, width, ratio == 4
        coff = 2 if self.overlap else 1
        self.wkv = nn.Linear(dims, coff * width, bias=False)
        self.wgate = nn.Linear(dims, coff * width, bias=False)
        self.ape = mx.zeros((ratio, coff * width), dtype=mx.float32)
        self.norm = nn.RMSNorm(width, eps=eps)

    def __call__(self, x: mx.array, state: CompressorState, rope: PartialRoPE) -> mx.array:
        """x (B, L, D): the new tokens. Updates `state`; returns every entry so far, (B, count, width)."""
        kv = self.wkv(x).astype(mx.float32)
        gate = self.wgate(x).astype(mx.float32)
        if state.pending_kv is not None:
            kv = mx.concatenate([state.pending_kv, kv], axis=1)
            gate = mx.concatenate([state.pending_gate, gate], axis=1)
        B, T, C = kv.shape
        usable = T // self.ratio * self.ratio
        state.pending_kv, state.pending_gate = kv[:, usable:], gate[:, usable:]
        if usable == 0:
            return state.append(mx.zeros((B, 0, self.width), x.dtype))
        n = usable // self.ratio
        kv = kv[:, :usable].reshape(B, n, self.ratio, C)
        gate = gate[:, :usable].reshape(B, n, self.ratio, C) + self.ape
        if self.overlap:
            kv, gate = self._overlap(kv, gate, state)
        pooled = (kv * mx.softmax(gate, axis=2)).sum(axis=2)  # (B, n, width)
        entries = self.norm(pooled.astype(x.dtype))
        # window i starts at (count + i) * ratio: rope with positions count.. scaled by ratio
        entries = rope(entries[:, None], offset=state.count, stride=self.ratio)[:, 0]
        return state.append(entries)

    def _overlap(self, kv: mx.array, gate: mx.array, state: CompressorState) -> tuple[mx.array, mx.array]:
        """(B, n, r, 2w) -> (B, n, 2r, w): each window's second half after the previous window's first."""
        w = self.width
        B, n, r, _ = kv.shape
        if state.prev_kv is None:
            first_kv = mx.zeros((B, 1, r, w), kv.dtype)
            first_gate = mx.full((B, 1, r, w), -mx.inf, gate.dtype)
        else:
            first_kv, first_gate = state.prev_kv[:, None], state.prev_gate[:, None]
        prev_kv = mx.concatenate([first_kv, kv[:, :-1, :, :w]], axis=1)
        prev_gate = mx.concatenate([first_gate, gate[:, :-1, :, :w]], axis=1)
        state.prev_kv, state.prev_gate = kv[:, -1, :, :w], gate[:, -1, :, :w]
        return (mx.concatenate([prev_kv, kv[..., w:]], axis=2),
                mx.concatenate([prev_gate, gate[..., w:]], axis=2))


def visible_entries(positions: mx.array, count: int, ratio: int) -> mx.array:
    """(L,) query positions -> (L, count) bool: entry w is complete for the query at t."""
    return mx.arange(count)[None, :] < ((positions + 1) // ratio)[:, None]


class Indexer(nn.Module):
    def __init__(self, dims: int, q_lora_rank: int, heads: int, head_dim: int, topk: int, eps: float):
        super().__init__()
        self.heads, self.head_dim, self.topk = heads, head_dim, topk
        self.wq_b = nn.Linear(q_lora_rank, heads * head_dim, bias=False)
        self.weights_proj = nn.Linear(dims, heads, bias=False)
        self.compressor = Compressor(dims, head_dim, 4, eps)

    def __call__(self, x: mx.array, q_latent: mx.array, state: CompressorState, rope: PartialRoPE,
                 offset: int, visible: mx.array) -> Optional[tuple[mx.array, mx.array]]:
        """Each query's picks among the entries: (indices (B, L, k), valid (B, L, k)), or None when
        there are at most `index_topk` entries (then every visible one is picked)."""
        keys = self.compressor(x, state, rope)  # keep the indexer's own entries in step
        if keys.shape[1] <= self.topk:
            return None
        B, L, _ = x.shape
        q = self.wq_b(q_latent).reshape(B, L, self.heads, self.head_dim).swapaxes(1, 2)
        q = rope(q, offset=offset).astype(mx.float32)  # (B, H, L, d)
        scores = mx.maximum(q @ keys.astype(mx.float32)[:, None].swapaxes(-1, -2), 0)  # (B, H, L, n)
        w = self.weights_proj(x).astype(mx.float32) * (self.heads**-0.5 * self.head_dim**-0.5)
        score = (scores * w.swapaxes(1, 2)[..., None]).sum(axis=1)  # (B, L, n)
        score = mx.where(visible[None], score, -mx.inf)
        picks = mx.argpartition(-score, kth=self.topk - 1, axis=-1)[..., : self.topk]
        return picks, mx.take_along_axis(mx.broadcast_to(visible[None], score.shape), picks, axis=-1)
