"""Multi-head Latent Attention (DeepSeek-V2 section 2.1) on a cache of latents.

Keys and values are never cached per head. Each token contributes a normalized latent
c (kv_lora_rank) and a RoPE'd key k_pe (qk_rope_head_dim) shared by all heads. The per-head
up-projections of `kv_b_proj` are split at load into `key_up` (H, nope, R) and `value_up` (H, v, R),
DeepSeek's own per-head view of that matrix, so a quantized `kv_b_proj` is used as stored.

score(q, t) = q_nope . (key_up c_t) + q_pe . k_pe_t    and    out = value_up (sum_t p_t c_t)

Two ways to evaluate the same thing:
- absorbed: move key_up onto the query (q_nope key_up, width R) and value_up after the weighted
  sum, so attention runs on the latents directly. Work grows with L * T * 2R.
- decompressed: expand every cached latent into per-head keys and values first. Costs
  T * R * (nope + v) up front, then L * T * (nope + v).
`MLA.absorbs(L, T)` picks the cheaper one; decode (L = 1) always absorbs for T > 1. In both the
RoPE term is computed once and handed to attention as an additive mask, together with causality.

DeepSeek-V3.2 adds a lightning indexer (`indexer.py`): past `index_topk` cached tokens, each query
attends only to the rows it chose (`sparse.py`); below that, attention is the dense MLA above.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .indexer import Indexer
from .quant import QuantizedWeights
from .rope import RoPE, softmax_scale
from .sparse import sparse_attention


class HeadProjection(nn.Module):
    """One matrix per head, weight (H, out, in): x (.., H, L, in) -> (.., H, L, out); `.t` maps back."""

    def __init__(self, heads: int, in_dims: int, out_dims: int):
        super().__init__()
        bound = math.sqrt(1.0 / in_dims)
        self.weight = mx.random.uniform(-bound, bound, (heads, out_dims, in_dims))

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight.swapaxes(-1, -2)

    def t(self, x: mx.array) -> mx.array:
        """x (.., H, L, out) -> (.., H, L, in): the transposed map."""
        return x @ self.weight

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedHeadProjection(self.weight, group_size, bits, mode)


class QuantizedHeadProjection(QuantizedWeights):
    def __call__(self, x: mx.array) -> mx.array:
        return self.matmul(x, transpose=True)

    def t(self, x: mx.array) -> mx.array:
        return self.matmul(x, transpose=False)


def causal_mask(queries: int, keys: int) -> mx.array:
    """(L, T) boolean: the L new tokens are the last L of the T keys."""
    rows = mx.arange(keys - queries, keys)[:, None]
    return mx.arange(keys)[None] <= rows


class MLA(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.heads = H = args.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.rank = R = args.kv_lora_rank
        self.q_lora_rank = args.q_lora_rank
        bias = args.attention_bias
        D = args.hidden_size
        if args.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * args.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, args.q_lora_rank, bias=bias)
            self.q_a_layernorm = nn.RMSNorm(args.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(args.q_lora_rank, H * args.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, R + self.rope_dim, bias=bias)
        self.kv_a_layernorm = nn.RMSNorm(R, eps=1e-6)
        self.key_up = HeadProjection(H, R, self.nope)
        self.value_up = HeadProjection(H, R, self.v_dim)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)
        self.rope = RoPE(self.rope_dim, args.rope_theta, args.rope_scaling)
        self.scale = softmax_scale(args.qk_head_dim, args.rope_scaling)
        if args.sparse:
            self.indexer = Indexer(args)

    def absorbs(self, L: int, T: int) -> bool:
        """True when attending on latents is cheaper (in multiply-adds) than decompressing them."""
        R, up = self.rank, self.nope + self.v_dim
        absorbed = L * R * up + L * T * 2 * R
        decompressed = T * R * up + L * T * up
        return absorbed <= decompressed

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, L, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            qr = self.q_a_layernorm(self.q_a_proj(x))  # the query latent (V3.2's indexer reads it too)
            q = self.q_b_proj(qr)
        q = q.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.nope], axis=-1)

        latent, k_pe = mx.split(self.kv_a_proj_with_mqa(x), [self.rank], axis=-1)
        latent = self.kv_a_layernorm(latent)[:, None]  # (B, 1, L, R): one "head" shared by all
        k_pe = k_pe[:, None]
        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset)
        k_pe = self.rope(k_pe, offset)
        index_keys = (self.indexer.key(x, offset),) if "indexer" in self else ()
        if cache is not None:
            latent, k_pe, *index_keys = cache.update_and_fetch(latent, k_pe, *index_keys)
        T = k_pe.shape[2]
        if index_keys and T > self.indexer.topk:  # DeepSeek Sparse Attention: each query reads its top k
            out = sparse_attention(self, x, qr, q_nope, q_pe, latent, k_pe, index_keys[0], offset, cache)
            return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

        bias = (q_pe * self.scale) @ k_pe.swapaxes(-1, -2)  # (B, H, L, T)
        if L > 1:
            bias = mx.where(causal_mask(L, T), bias, mx.array(mx.finfo(bias.dtype).min, bias.dtype))
        if hasattr(cache, "key_mask"):  # a batch of sequences of different lengths, right-padded
            bias = mx.where(cache.key_mask()[:, None, None], bias, mx.array(mx.finfo(bias.dtype).min, bias.dtype))

        if isinstance(latent, tuple):  # a quantized cache: attend on the quantized latents as stored
            out = self.value_up(self._attend_quantized(self.key_up.t(q_nope), latent, bias, cache))
        elif self.absorbs(L, T):
            q_latent = self.key_up.t(q_nope)  # (B, H, L, R)
            out = mx.fast.scaled_dot_product_attention(
                q_latent, latent, latent, scale=self.scale, mask=bias
            )
            out = self.value_up(out)
        else:
            keys, values = self.key_up(latent), self.value_up(latent)  # (B, H, T, .)
            out = mx.fast.scaled_dot_product_attention(q_nope, keys, values, scale=self.scale, mask=bias)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _attend_quantized(self, q_latent: mx.array, latent: tuple, bias: mx.array, cache) -> mx.array:
        """Absorbed attention with both products on the quantized latent (B, 1, T, R): the heads and
        query positions become rows of one matmul against the shared latent."""
        B, H, L, R = q_latent.shape
        T = bias.shape[-1]
        quant = dict(group_size=cache.group_size, bits=cache.bits)
        rows = (q_latent * self.scale).reshape(B, 1, H * L, R)
        scores = mx.quantized_matmul(rows, *latent, transpose=True, **quant).reshape(B, H, L, T) + bias
        p = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q_latent.dtype)
        out = mx.quantized_matmul(p.reshape(B, 1, H * L, T), *latent, transpose=False, **quant)
        return out.reshape(B, H, L, R)
