"""The DeepSeek-V4 decoder: embedding -> hc_mult streams -> N blocks -> hyper head -> norm -> head.

A block is attention then MoE, each wrapped in a hyper-connection (collapse the streams into the
block's input, expand its output back and mix the streams). The MTP block takes the main model's
streams (before the hyper head) and the embeddings of the next tokens:
    x = e_proj(enorm(embed(t_{i+1}))) + h_proj(hnorm(streams_i))     (per stream)
then one sliding-window block, its own hyper head and norm, and the main LM head.
Parameter names follow DeepSeek's published checkpoint (`layers.N.attn.wq_a`, `hc_attn`, ...).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .attention import Attention
from .cache import V4LayerCache, make_v4_cache
from .config import V4Args
from .hyper import HyperConnection, HyperHead
from .moe import MoE


class Block(nn.Module):
    def __init__(self, args: V4Args, layer: int):
        super().__init__()
        D, eps = args.hidden_size, args.rms_norm_eps
        self.attn = Attention(args, layer)
        self.ffn = MoE(args, layer)
        self.attn_norm = nn.RMSNorm(D, eps=eps)
        self.ffn_norm = nn.RMSNorm(D, eps=eps)
        self.hc_attn = HyperConnection(D, args.hc_mult, args.hc_sinkhorn_iters, args.hc_eps, eps)
        self.hc_ffn = HyperConnection(D, args.hc_mult, args.hc_sinkhorn_iters, args.hc_eps, eps)

    def __call__(self, h: mx.array, tokens: mx.array, cache: V4LayerCache) -> mx.array:
        """h (B, L, N, D) streams -> new streams."""
        x, post, comb = self.hc_attn(h)
        h = HyperConnection.expand(self.attn(self.attn_norm(x), cache), h, post, comb)
        x, post, comb = self.hc_ffn(h)
        return HyperConnection.expand(self.ffn(self.ffn_norm(x), tokens), h, post, comb)


class MTPBlock(nn.Module):
    def __init__(self, args: V4Args):
        super().__init__()
        D, eps = args.hidden_size, args.rms_norm_eps
        self.enorm = nn.RMSNorm(D, eps=eps)
        self.hnorm = nn.RMSNorm(D, eps=eps)
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.block = Block(args, args.num_hidden_layers)
        self.hc_head = HyperHead(D, args.hc_mult, args.hc_eps, eps)
        self.norm = nn.RMSNorm(D, eps=eps)

    def __call__(self, streams: mx.array, next_embeddings: mx.array, next_tokens: mx.array,
                 cache: V4LayerCache) -> mx.array:
        """Main streams (B, L, N, D) and the next tokens' embeddings (B, L, D) -> (B, L, D) for the head."""
        x = self.e_proj(self.enorm(next_embeddings))[:, :, None] + self.h_proj(self.hnorm(streams))
        return self.norm(self.hc_head(self.block(x, next_tokens, cache)))


class Model(nn.Module):
    """tokens (B, L) -> logits (B, L, vocab); pass `cache=model.make_cache()` to decode incrementally.

    Without a cache a fresh one is used (a whole prompt in one pass). With `mtp=True` the model
    also holds the MTP block (`model.mtp`).
    """

    def __init__(self, args: V4Args, mtp: bool = False):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args, i) for i in range(args.num_hidden_layers)]
        self.hc_head = HyperHead(args.hidden_size, args.hc_mult, args.hc_eps, args.rms_norm_eps)
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if mtp:
            self.mtp = MTPBlock(args)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        return self.logits(self.hidden(tokens, cache))

    def hidden(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        """The residual streams after the last block, (B, L, hc_mult, D) (what the head and MTP take)."""
        cache = cache if cache is not None else self.make_cache()
        end = cache[0].offset + tokens.shape[1]
        if end > self.args.max_position_embeddings:
            raise ValueError(f"{end} tokens exceed the model's context (max_position_embeddings="
                             f"{self.args.max_position_embeddings})")
        h = self.embed(tokens)
        h = mx.broadcast_to(h[:, :, None], (*h.shape[:2], self.args.hc_mult, h.shape[-1]))
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, tokens, layer_cache)
        return h

    def logits(self, streams: mx.array) -> mx.array:
        return self.head(self.norm(self.hc_head(streams)))

    def draft_logits(self, streams: mx.array, next_tokens: mx.array, cache: V4LayerCache) -> mx.array:
        """The MTP block's logits: at i, from the streams of i and t_{i+1}, for the token t_{i+2}."""
        return self.head(self.mtp(streams, self.embed(next_tokens), next_tokens, cache))

    def make_cache(self, kv_bits: Optional[int] = None, kv_group_size: int = 64) -> list[V4LayerCache]:
        if kv_bits:
            raise ValueError("--kv-bits is not supported for deepseek_v4 yet (its cache is mostly the "
                             "128-token windows and compressed entries)")
        return make_v4_cache(self.args, range(self.args.num_hidden_layers))

    def make_draft_cache(self) -> V4LayerCache:
        return make_v4_cache(self.args, range(self.args.num_hidden_layers, self.args.num_hidden_layers + 1))[0]
