"""One MLA decoder block: pre-norm MLA attention on the latent cache, then a pre-norm MoE or dense MLP."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .cache import LatentCache
from .config import ModelArgs
from .mla import MLA
from .moe import MLP, MoE


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, index: int):
        super().__init__()
        self.self_attn = MLA(args)
        if args.is_moe_layer(index):
            self.mlp = MoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: Optional[LatentCache] = None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))
