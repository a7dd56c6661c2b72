"""DeepSeek Sparse Attention on the latent cache: each query attends only to the rows its indexer chose.

Past `index_topk` cached tokens (below it, MLA is dense and this is not used), queries are taken in
blocks; for each block the indexer scores the block against every cached indexer key, keeps the top k
per query, and the chosen rows of the latent cache (latent and RoPE key: 512 + 64 values per token on
V3.2, or their quantized words) are gathered per query. Attention is then MLA's absorbed attention with
every query its own batch row against its own k rows, so decode (L = 1) reads k rows whatever the
context, and a prompt chunk of L queries costs L * k, not L * T. Selected rows a query may not see yet
(a row with fewer than k visible tokens) are masked out.

The block size bounds the memory of the scores (rows * heads * T floats) and of the gathered rows
(rows * k * (R + rope)).
"""

from __future__ import annotations

import mlx.core as mx

BLOCK_ELEMENTS = 1 << 26  # per block: at most this many indexer logits or gathered latent values


def query_block(L: int, T: int, heads: int, k: int, width: int) -> int:
    return max(1, min(L, BLOCK_ELEMENTS // max(heads * T, k * width)))


def gather_rows(a: mx.array, chosen: mx.array) -> mx.array:
    """Cache rows (B, 1, T, W) at chosen (B, L, k) -> one batch row per query, (B * L, 1, k, W)."""
    B, L, k = chosen.shape
    rows = mx.take_along_axis(a, chosen[..., None], axis=2)  # (B, L, k, W)
    return rows.reshape(B * L, 1, k, a.shape[-1])


def per_query(x: mx.array) -> mx.array:
    """(B, H, L, W) -> (B * L, H, 1, W): each query position its own batch row."""
    B, H, L, W = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B * L, H, 1, W)


def attend_rows(q_rows: mx.array, rows: mx.array, bias: mx.array, scale: float) -> mx.array:
    """Absorbed attention of each query row (N, H, 1, R) on its own latent rows (N, 1, k, R), bias
    (N, H, 1, k): the heads become rows of one matmul against the shared rows (as `MLA._attend_quantized`
    does on quantized ones). Not `mx.fast.scaled_dot_product_attention`: on MLX's CPU backend (0.32.4)
    that call with 128 query heads on one key head and a mask ends in a segmentation fault at V3.2's
    shapes (32 x 128 queries on 2048 rows of 512)."""
    N, H, _, R = q_rows.shape
    k = rows.shape[2]
    scores = ((q_rows * scale).reshape(N, 1, H, R) @ rows.swapaxes(-1, -2)).reshape(N, H, 1, k) + bias
    p = mx.softmax(scores.astype(mx.float32), axis=-1).astype(q_rows.dtype)
    return (p.reshape(N, 1, H, k) @ rows).reshape(N, H, 1, R)


def sparse_attention(mla, x, qr, q_nope, q_pe, latent, k_pe, index_keys, offset, cache) -> mx.array:
    """MLA output (B, H, L, v_head_dim) for L queries at offset.. (an int, or (B,) for a batch cache) on
    the T cached tokens (T > index_topk); `latent` is (B, 1, T, R) or a quantized cache's (words,
    scales, biases)."""
    B, H, L, _ = q_nope.shape
    indexer = mla.indexer
    T = k_pe.shape[2]
    k = min(indexer.topk, T)
    q_latent = mla.key_up.t(q_nope)  # (B, H, L, R): absorbed queries
    q_index, w_index = indexer.queries(x, qr, offset)
    parts = latent if isinstance(latent, tuple) else (latent,)
    width = sum(p.shape[-1] for p in parts) + k_pe.shape[-1]
    step = query_block(L, T, indexer.heads, k, width)
    outs = []
    for start in range(0, L, step):
        end = min(L, start + step)
        scores = indexer.scores(q_index[:, start:end], w_index[:, start:end], index_keys)
        chosen, visible = indexer.select(scores, offset + start)
        chosen = chosen.astype(mx.uint32)
        rows_pe = gather_rows(k_pe, chosen)
        rows = tuple(gather_rows(p, chosen) for p in parts)
        q_rows = per_query(q_latent[:, :, start:end])
        bias = (per_query(q_pe[:, :, start:end]) * mla.scale) @ rows_pe.swapaxes(-1, -2)  # (B*l, H, 1, k)
        n = end - start
        hide = mx.array(mx.finfo(bias.dtype).min, bias.dtype)
        bias = mx.where(visible.reshape(B * n, 1, 1, k), bias, hide)
        if isinstance(latent, tuple):
            out = mla._attend_quantized(q_rows, rows, bias, cache)
        else:
            out = attend_rows(q_rows, rows[0], bias, mla.scale)
        outs.append(out.reshape(B, n, H, -1).transpose(0, 2, 1, 3))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
    return mla.value_up(out)
