"""DeepSeek-V4 attention: one shared key=value head, a sliding window, compressed entries, sinks.

Every layer: queries through a low-rank latent (wq_a -> q_norm -> wq_b, then a weightless RMS norm
per head); one key per token, which is also its value (MQA, head_dim 512), RMS-normed; RoPE on
the last rope dims of both. A query sees the last `sliding_window` tokens (itself included) and,
in a compressed layer, the compressed entries it may see (HCA: every complete one; CSA: the
indexer's top-k of them). Each head has a learned sink: a logit in the softmax denominator with
no value. The softmax scale is head_dim^-0.5. The output's rope dims are rotated back (its values
carried the keys' rotation), then the grouped projection: heads in o_groups groups, each group
projected by its own matrix (wo_a, one HeadProjection per group) to o_lora_rank, then wo_b.
"""

from __future__ import annotations


import mlx.core as mx
import mlx.nn as nn

from ..mla import HeadProjection
from .cache import V4LayerCache
from .compressor import Compressor, Indexer, visible_entries
from .config import V4Args
from .rope import PartialRoPE


def window_mask(positions: mx.array, key_start: int, keys: int, window: int) -> mx.array:
    """(L, keys) bool: key j (at position key_start + j) is in the window of the query at t."""
    s = key_start + mx.arange(keys)[None, :]
    t = positions[:, None]
    return (s <= t) & (s > t - window)


class Attention(nn.Module):
    def __init__(self, args: V4Args, layer: int):
        super().__init__()
        self.heads, self.head_dim = args.num_attention_heads, args.head_dim
        self.groups, self.window, self.eps = args.o_groups, args.sliding_window, args.rms_norm_eps
        self.ratio = args.compress_ratio(layer)
        self.scale = args.head_dim**-0.5
        D = args.hidden_size
        self.wq_a = nn.Linear(D, args.q_lora_rank, bias=False)
        self.q_norm = nn.RMSNorm(args.q_lora_rank, eps=args.rms_norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, self.heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(D, self.head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.wo_a = HeadProjection(self.groups, self.heads * self.head_dim // self.groups, args.o_lora_rank)
        self.wo_b = nn.Linear(self.groups * args.o_lora_rank, D, bias=False)
        self.attn_sink = mx.zeros((self.heads,), dtype=mx.float32)
        if self.ratio:
            self.rope = PartialRoPE(args.qk_rope_head_dim, args.compress_rope_theta, args.rope_scaling)
            self.compressor = Compressor(D, self.head_dim, self.ratio, args.rms_norm_eps)
            if self.ratio == 4:
                self.indexer = Indexer(D, args.q_lora_rank, args.index_n_heads, args.index_head_dim,
                                       args.index_topk, args.rms_norm_eps)
        else:
            self.rope = PartialRoPE(args.qk_rope_head_dim, args.rope_theta)

    def __call__(self, x: mx.array, cache: V4LayerCache) -> mx.array:
        B, L, _ = x.shape
        offset = cache.offset
        positions = offset + mx.arange(L)
        q_latent = self.q_norm(self.wq_a(x))
        q = self.wq_b(q_latent).reshape(B, L, self.heads, self.head_dim).swapaxes(1, 2)
        q = self.rope(mx.fast.rms_norm(q, None, self.eps), offset=offset)
        kv = self.rope(self.kv_norm(self.wkv(x))[:, None], offset=offset)  # (B, 1, L, head_dim)

        keys = cache.update_window(kv)
        held = keys.shape[2] - L
        mask = mx.broadcast_to(window_mask(positions, offset - held, keys.shape[2], self.window)[None, None],
                               (B, 1, L, keys.shape[2]))
        if self.ratio:
            entries = self.compressor(x, cache.compressor, self.rope)
            visible = visible_entries(positions, entries.shape[1], self.ratio)
            picked = self.indexer(x, q_latent, cache.indexer, self.rope, offset, visible) if self.ratio == 4 else None
            if picked is None:  # HCA, or no more entries than index_topk: every visible one
                chosen = mx.broadcast_to(visible[None], (B, *visible.shape))
            elif L == 1:  # decoding: read only the picked entries, whatever the context
                picks, chosen = picked
                entries = mx.take_along_axis(entries, picks[:, 0, :, None], axis=1)
            else:  # a prompt chunk: the picks as a mask over all entries
                picks, valid = picked
                chosen = mx.put_along_axis(mx.zeros((B, L, entries.shape[1]), mx.bool_), picks, valid, axis=-1)
            keys = mx.concatenate([keys, entries[:, None].astype(keys.dtype)], axis=2)
            mask = mx.concatenate([mask, chosen[:, None]], axis=-1)
        cache.offset = offset + L

        sinks = self.attn_sink.astype(q.dtype)
        out = mx.fast.scaled_dot_product_attention(q, keys, keys, scale=self.scale, mask=mask, sinks=sinks)
        out = self.rope(out, offset=offset, inverse=True)  # (B, H, L, head_dim)
        out = out.swapaxes(1, 2).reshape(B, L, self.groups, -1).swapaxes(1, 2)  # (B, g, L, H/g * head_dim)
        out = self.wo_a(out).swapaxes(1, 2).reshape(B, L, -1)
        return self.wo_b(out)
