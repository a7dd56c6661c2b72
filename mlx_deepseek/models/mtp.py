"""DeepSeek-V3's multi-token-prediction (MTP) module, used here as a built-in draft model.

For main-sequence position i with final hidden state h_i and the next token t_{i+1}:

    x_i = eh_proj(concat([enorm(embed(t_{i+1})), hnorm(h_i)]))   # the embedding comes first
    x_i = DecoderLayer(x_i)                                       # MLA + MoE, its own latent cache
    p_i = softmax(lm_head(head_norm(x_i)))                        # predicts t_{i+2}

h_i is taken AFTER the main model's final norm: that is what vLLM's `deepseek_mtp.py` and
SGLang's nextn feed it (the hidden states the target model returns are post-norm), and what
shared/models/tinyseek-py was trained with (its README, "MTP module - exact convention").
The checkpoint stores `embed_tokens` and `shared_head.head` again inside the MTP layer. In DeepSeek's
checkpoints they equal the main embedding and `lm_head` (README_WEIGHTS): the loader checks that and
shares the main ones instead of holding two copies. A fine-tune may train them apart: then the MTP
module holds and uses its own (`own_copies`), as vLLM does with the stored ones.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .block import DecoderLayer
from .cache import LatentCache
from .config import ModelArgs


class MTP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        D = args.hidden_size
        self.enorm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = DecoderLayer(args, args.num_hidden_layers)
        self.head_norm = nn.RMSNorm(D, eps=args.rms_norm_eps)
        self.vocab_size, self.hidden_size = args.vocab_size, D

    def own_copies(self, embedding: bool, head: bool) -> None:
        """Hold an embedding and/or a head of its own (the stored ones differ from the main model's)."""
        if embedding:
            self.embed_tokens = nn.Embedding(self.vocab_size, self.hidden_size)
        if head:
            self.lm_head = nn.Linear(self.hidden_size, self.vocab_size, bias=False)

    def embed(self, tokens: mx.array, main_embedding: nn.Module) -> mx.array:
        return (self.embed_tokens if "embed_tokens" in self else main_embedding)(tokens)

    def head(self, x: mx.array, main_logits) -> mx.array:
        return self.lm_head(x) if "lm_head" in self else main_logits(x)

    def __call__(self, hidden: mx.array, next_embeddings: mx.array, cache: Optional[LatentCache] = None) -> mx.array:
        """(B, L, D) main hidden states and embeddings of the tokens after them -> (B, L, D), ready for the head."""
        x = self.eh_proj(mx.concatenate([self.enorm(next_embeddings), self.hnorm(hidden)], axis=-1))
        return self.head_norm(self.block(x, cache))
