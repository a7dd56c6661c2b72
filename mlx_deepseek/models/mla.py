"""Multi-head Latent Attention (DeepSeek-V2 section 2.1) on a cache of latents.

Keys and values are never cached per head. Each token contributes a normalized latent
c (kv_lora_rank) and a RoPE'd key k_pe (qk_rope_head_dim) shared by all heads. The per-head
up-projections of `kv_b_proj` are split at load into `key_up` (H, nope, R) and `value_up` (H, v, R),
DeepSeek's own per-head view of that matrix, so a quantized `kv_b_proj` is used as stored.

score(q, t) = q_nope . (key_up c_t) + q_pe . k_pe_t    and    out = value_up (sum_t p_t c_t)

Two ways to evaluate the same thing:
- absorbed: move key_up onto the query (q_nope key_up, width R) and value_up after the weighted
  sum, so attention runs on the latents directly. Work grows with L * T * 2R.
- decompressed: expand the cached latents into per-head keys [key_up c, k_pe] and values first.
  Costs T * R * (nope + v) up front, then L * T * (nope + rope + v). The expansion multiplies
  thousands of latents by key_up / value_up, so those are dequantized once per call (H x (nope + v)
  x R values: 33 MB per layer for V3 in bf16) and applied as dense matmuls, measured 2.7x faster
  here than quantized matmuls over the same rows. The history is expanded `block_tokens` at a
  time with an online softmax across blocks, so the transient is those weights and one block of
  keys, values and scores (at most `DECOMPRESS_BUDGET` bytes), not the whole history x heads.
`MLA.absorbs(L, T)` picks the cheaper one; decode (L = 1) always absorbs for T > 1. The absorbed
path hands the RoPE term to attention as an additive mask (with causality); the decompressed one
concatenates it onto the keys and masks with booleans.

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

    def dense(self) -> mx.array:
        """The map as one row-major (H, in, out) matrix: x @ dense() == self(x)."""
        return mx.contiguous(self.weight.swapaxes(-1, -2))

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedHeadProjection(self.weight, group_size, bits, mode)


class QuantizedHeadProjection(QuantizedWeights):
    def __call__(self, x: mx.array) -> mx.array:
        return self.matmul(x, transpose=True)

    def t(self, x: mx.array) -> mx.array:
        return self.matmul(x, transpose=False)

    def dense(self) -> mx.array:
        """Dequantized once, as one row-major (H, in, out) matrix: x @ dense() == self(x)."""
        return mx.contiguous(self.dequantized().swapaxes(-1, -2))


def causal_mask(queries: int, keys: int) -> mx.array:
    """(L, T) boolean: the L new tokens are the last L of the T keys."""
    return visible(queries, keys, 0, keys)


def visible(queries: int, keys: int, start: int, stop: int, key_mask=None):
    """Which of keys start..stop each of the L new tokens (the last L of T) may see: boolean
    (L, stop - start), or (B, 1, L | 1, stop - start) with a batch key mask (B, T); None when all."""
    mask = None
    if queries > 1:
        rows = mx.arange(keys - queries, keys)[:, None]
        mask = mx.arange(start, stop)[None] <= rows
    if key_mask is not None:
        keep = key_mask[:, None, None, start:stop]
        mask = keep if mask is None else mx.logical_and(mask, keep)
    return mask


def online_softmax_step(state, scores: mx.array, values: mx.array):
    """Fold one key block into a softmax-weighted sum across blocks (flash-style). `state` is
    (running max, running normalizer, running weighted sum), all float32, or None before the first."""
    scores = scores.astype(mx.float32)
    block_max = scores.max(axis=-1, keepdims=True)
    m = block_max if state is None else mx.maximum(state[0], block_max)
    p = mx.exp(scores - m)
    norm = p.sum(axis=-1, keepdims=True)
    acc = (p.astype(values.dtype) @ values).astype(mx.float32)
    if state is not None:
        carry = mx.exp(state[0] - m)
        norm, acc = state[1] * carry + norm, state[2] * carry + acc
    return m, norm, acc


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

    # The decompressed path expands `block_tokens` cached tokens at a time, so its transient per
    # layer is at most about DECOMPRESS_BUDGET bytes, whatever the history's length.
    DECOMPRESS_BUDGET = 256 * 2**20

    def absorbs(self, L: int, T: int) -> bool:
        """True when attending on latents is cheaper than decompressing them, by multiply-adds per
        head (the RoPE term on both sides). On a long cache it absorbs up to ~170-token chunks;
        measured with `python -m bench.chunk_attention` (README, "Chunks on a long cache"), the two
        paths' times cross at ~128 tokens and are within 6% of each other between the two."""
        R, up, rope = self.rank, self.nope + self.v_dim, self.rope_dim
        absorbed = L * R * up + L * T * (2 * R + rope)
        decompressed = T * R * up + L * T * (up + rope)
        return absorbed <= decompressed

    def block_tokens(self, B: int, L: int, itemsize: int) -> int:
        """Cached tokens expanded at once on the decompressed path. Each token of a block holds
        B * H * (nope + rope + v) expanded values and B * H * L float32 scores, so one block is at
        most DECOMPRESS_BUDGET bytes (a multiple of 256 tokens, at least 256)."""
        per_token = B * self.heads * ((self.nope + self.rope_dim + self.v_dim) * itemsize + 4 * L)
        return max(256, self.DECOMPRESS_BUDGET // per_token // 256 * 256)

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

        key_mask = cache.key_mask() if hasattr(cache, "key_mask") else None  # (B, T): a right-padded batch
        if isinstance(latent, tuple):  # a quantized cache: attend on the quantized latents as stored
            bias = self._rope_bias(q_pe, k_pe, L, T, key_mask)
            out = self.value_up(self._attend_quantized(self.key_up.t(q_nope), latent, bias, cache))
        elif self.absorbs(L, T):
            out = self._attend_absorbed(q_nope, q_pe, latent, k_pe, key_mask)
        else:
            out = self._attend_decompressed(q_nope, q_pe, latent, k_pe, key_mask)
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

    def _rope_bias(self, q_pe, k_pe, L: int, T: int, key_mask) -> mx.array:
        """The RoPE term of the scores, masked keys at the dtype's minimum: (B, H, L, T)."""
        bias = (q_pe * self.scale) @ k_pe.swapaxes(-1, -2)
        mask = visible(L, T, 0, T, key_mask)
        if mask is not None:
            bias = mx.where(mask, bias, mx.array(mx.finfo(bias.dtype).min, bias.dtype))
        return bias

    def _attend_absorbed(self, q_nope, q_pe, latent, k_pe, key_mask) -> mx.array:
        """Attention on the latents (B, 1, T, R): key_up moves onto the query, value_up after the sum."""
        L, T = q_nope.shape[2], latent.shape[2]
        bias = self._rope_bias(q_pe, k_pe, L, T, key_mask)
        out = mx.fast.scaled_dot_product_attention(self.key_up.t(q_nope), latent, latent, scale=self.scale, mask=bias)
        return self.value_up(out)

    def _attend_decompressed(self, q_nope, q_pe, latent, k_pe, key_mask, block: int | None = None) -> mx.array:
        """Per-head keys [key_up c_t, k_pe_t] and values value_up c_t, expanded `block` cached tokens
        at a time (default `block_tokens`). One block: one SDPA with the RoPE key concatenated onto
        the keys, as mlx-lm does, and a boolean mask (no (B, H, L, T) additive one). More blocks: an
        online softmax across them, so the transient is one block of expanded keys, values and scores
        (<= DECOMPRESS_BUDGET bytes), never the whole history x heads."""
        B, H, L, _ = q_nope.shape
        T = latent.shape[2]
        block = block or self.block_tokens(B, L, latent.dtype.size)
        queries = mx.concatenate([q_nope, q_pe], axis=-1)
        key_up, value_up = self.key_up.dense(), self.value_up.dense()

        def keys_values(start, stop):
            c = latent[..., start:stop, :]
            pe = mx.broadcast_to(k_pe[..., start:stop, :], (B, H, stop - start, self.rope_dim))
            return mx.concatenate([c @ key_up, pe], axis=-1), c @ value_up

        if T <= block:
            keys, values = keys_values(0, T)
            return mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=self.scale, mask=visible(L, T, 0, T, key_mask))
        queries = queries * self.scale
        state = None
        for start in range(0, T, block):
            stop = min(start + block, T)
            keys, values = keys_values(start, stop)
            scores = queries @ keys.swapaxes(-1, -2)  # (B, H, L, stop - start)
            mask = visible(L, T, start, stop, key_mask)
            if mask is not None:
                scores = mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
            state = online_softmax_step(state, scores, values)
        _, norm, acc = state
        return (acc / norm).astype(q_nope.dtype)
