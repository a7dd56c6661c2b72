"""The DeepSeek MLA decoder (V2, V3, Kimi-K2): embedding, N x block, final norm, LM head."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import LatentCache, make_latent_cache
from .config import ModelArgs
from .mtp import MTP
from .block import DecoderLayer


class DeepseekModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        h = self.embed_tokens(tokens)
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    """tokens (B, L) -> logits (B, L, vocab); pass `cache=model.make_cache()` to decode incrementally.

    With `mtp=True` the model also holds DeepSeek's multi-token-prediction module (`model.mtp`).
    """

    def __init__(self, args: ModelArgs, mtp: bool = False):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DeepseekModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if mtp:
            self.mtp = MTP(args)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        return self.logits(self.model(tokens, cache))

    def hidden(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        """Final hidden states, after the norm (what the head and the MTP module take)."""
        return self.model(tokens, cache)

    def logits(self, hidden: mx.array) -> mx.array:
        """Final (post-norm) hidden states -> logits."""
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def draft_logits(self, hidden: mx.array, next_tokens: mx.array, cache: Optional[LatentCache] = None) -> mx.array:
        """The MTP module's logits: at i, from h_i and t_{i+1}, for the token t_{i+2}."""
        return self.mtp.head(self.mtp(hidden, self.mtp.embed(next_tokens, self.model.embed_tokens), cache), self.logits)

    @property
    def layers(self) -> list:
        return self.model.layers

    def make_draft_cache(self) -> LatentCache:
        """The MTP module's own latent cache."""
        return LatentCache()

    def make_cache(self, kv_bits: Optional[int] = None, kv_group_size: int = 64) -> list[LatentCache]:
        """One latent cache per layer; `kv_bits` (8 or 4) stores the latents quantized."""
        return [make_latent_cache(kv_bits, kv_group_size) for _ in self.layers]
