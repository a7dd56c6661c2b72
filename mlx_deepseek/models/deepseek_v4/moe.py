"""DeepSeek-V4's MoE: sqrt(softplus) scores, hash routing in the first layers, clamped SwiGLU.

Scores are sqrt(softplus(x . W)) in float32. The first `num_hash_layers` layers pick their experts
from a fixed table by token id (`tid2eid`, vocab x k); the others take the top k of score + bias
(no groups). Either way the weights are the chosen scores, renormalized to sum to one, times
`routed_scaling_factor`. Routed and shared experts are SwiGLU with `swiglu_limit` clamping, the
routed ones stacked (gather_mm / gather_qmm) as for V2/V3.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..moe import MLP, RoutedExperts, mix_experts
from .config import V4Args


class Gate(nn.Module):
    def __init__(self, args: V4Args, layer: int):
        super().__init__()
        self.top_k, self.scoring = args.num_experts_per_tok, args.scoring_func
        self.scaling = args.routed_scaling_factor
        self.hash = args.is_hash_layer(layer)
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if self.hash:
            self.tid2eid = mx.zeros((args.vocab_size, args.num_experts_per_tok), dtype=mx.int32)
        else:
            self.bias = mx.zeros((args.n_routed_experts,), dtype=mx.float32)

    def __call__(self, x: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """x (B, L, D), tokens (B, L) -> expert indices (B, L, k) and float32 weights (B, L, k)."""
        table = self.tid2eid[tokens] if self.hash else None
        return route(x, self.weight, self.get("bias"), table, self.top_k, self.scoring, self.scaling)


@mx.compile
def route(x, weight, bias, table, top_k: int, scoring: str, scaling: float) -> tuple[mx.array, mx.array]:
    """The gate's choice, one compiled graph (its elementwise steps fused): the experts `table`
    names (hash layers) or the top k of score + bias."""
    logits = x.astype(mx.float32) @ weight.astype(mx.float32).T
    if scoring == "softmax":
        scores = mx.softmax(logits, axis=-1)
    elif scoring == "sigmoid":
        scores = mx.sigmoid(logits)
    else:
        scores = mx.sqrt(nn.softplus(logits))
    if table is not None:
        indices = table
    else:
        indices = mx.argpartition(-(scores + bias), kth=top_k - 1, axis=-1)[..., :top_k]
    weights = mx.take_along_axis(scores, indices, axis=-1)
    if scoring != "softmax":
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return indices, weights * scaling


class MoE(nn.Module):
    def __init__(self, args: V4Args, layer: int):
        super().__init__()
        D, hidden, limit = args.hidden_size, args.moe_intermediate_size, args.swiglu_limit
        self.gate = Gate(args, layer)
        self.switch_mlp = RoutedExperts(D, hidden, args.n_routed_experts, limit)
        if args.n_shared_experts:
            self.shared_experts = MLP(D, hidden, limit)

    def __call__(self, x: mx.array, tokens: mx.array) -> mx.array:
        return mix_experts(self, x, *self.gate(x, tokens))
