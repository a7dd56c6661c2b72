"""DeepSeek's Mixture of Experts: a router, routed experts stored stacked, and shared experts.

Routers that real checkpoints use (`topk_method`, `scoring_func` in config.json):
- `greedy` (V2-Lite, Coder-V2-Lite): softmax scores, plain top-k.
- `group_limited_greedy` (V2, V2.5): softmax; keep the `topk_group` groups with the highest single
  expert score, then top-k inside them.
- `noaux_tc` (V3, R1, V3.1, Kimi-K2, Moonlight): sigmoid; `e_score_correction_bias` is added for
  the choice only; groups ranked by the sum of their two best biased scores.
Weights are the unbiased scores of the chosen experts. Sigmoid routers renormalize them when
`norm_topk_prob` (k > 1), then multiply by `routed_scaling_factor`. Softmax routers either
renormalize (norm_topk_prob) or scale, as DeepSeek's V2 code does; every published V2 config
has norm_topk_prob false, so they scale.

Where Hugging Face transformers differs (we follow DeepSeek's code and the config):
- its V3 router ignores `topk_method`/`scoring_func` and always runs sigmoid noaux_tc;
- its V2 router ignores `norm_topk_prob` (it always scales);
- it hides excluded groups with 0, DeepSeek with -inf; we use -inf, so a negative biased score can
  never lose to an excluded expert.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import ModelArgs
from .quant import QuantizedWeights


@mx.compile
def swiglu(gate: mx.array, up: mx.array, limit: float = 0.0) -> mx.array:
    """silu(gate) * up; with a `limit` (DeepSeek-V4's swiglu_limit) gate is clipped above at limit
    and up to [-limit, limit] first. Compiled: one fused kernel instead of two to four."""
    if limit:
        gate = mx.minimum(gate, limit)
        up = mx.clip(up, -limit, limit)
    return nn.silu(gate) * up


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, dims: int, hidden: int, limit: float = 0.0):
        super().__init__()
        self.limit = limit
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


class Router(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.method, self.scoring = args.topk_method, args.scoring_func
        self.n_group, self.topk_group = args.n_group, args.topk_group
        self.normalize = args.norm_topk_prob and self.top_k > 1
        self.scaling = args.routed_scaling_factor
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """x (..., D) -> expert indices (..., k) and their float32 weights (..., k)."""
        return route(x, self.weight, self.get("e_score_correction_bias"), self.top_k, self.method, self.scoring,
                     self.n_group, self.topk_group, self.normalize, self.scaling)


@mx.compile
def route(x, weight, bias, top_k: int, method: str, scoring: str, n_group: int, topk_group: int,
          normalize: bool, scaling: float) -> tuple[mx.array, mx.array]:
    """The router's choice, one compiled graph (its elementwise steps fused): see `Router`."""
    # Routing decisions are fragile: score in float32 whatever the model's dtype (the loader
    # keeps the router weight in float32, so the cast below costs nothing).
    logits = x.astype(mx.float32) @ weight.astype(mx.float32).T
    scores = mx.sigmoid(logits) if scoring == "sigmoid" else mx.softmax(logits, axis=-1)
    choice = scores + bias if method == "noaux_tc" else scores
    if method != "greedy" and n_group > 1 and topk_group < n_group:
        choice = keep_best_groups(choice, method, n_group, n_group - topk_group)
    indices = mx.stop_gradient(mx.argpartition(-choice, kth=top_k - 1, axis=-1)[..., :top_k])
    weights = mx.take_along_axis(scores, indices, axis=-1)
    if normalize:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    if not normalize or scoring == "sigmoid":
        weights = weights * scaling
    return indices, weights


def keep_best_groups(choice: mx.array, method: str, n_group: int, dropped: int) -> mx.array:
    """`choice` with the experts of the `dropped` worst groups at -inf: groups ranked by their two
    best scores' sum (noaux_tc) or their best score (group_limited_greedy)."""
    grouped = mx.unflatten(choice, -1, (n_group, -1))
    if method == "noaux_tc":
        group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1)
    else:
        group_scores = grouped.max(axis=-1)
    worst = mx.argpartition(group_scores, kth=dropped - 1, axis=-1)[..., :dropped]
    grouped = mx.put_along_axis(grouped, worst[..., None], mx.array(-math.inf, grouped.dtype), axis=-2)
    return mx.flatten(grouped, -2, -1)


class ExpertLinear(nn.Module):
    """Stacked expert matrices (E, out, in); each input row is multiplied by its expert's matrix."""

    def __init__(self, experts: int, in_dims: int, out_dims: int):
        super().__init__()
        bound = math.sqrt(1.0 / in_dims)
        self.weight = mx.random.uniform(-bound, bound, (experts, out_dims, in_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False, lhs=None) -> mx.array:
        """`lhs`: which row of x each output reads (default: row i for output i)."""
        w = self.weight.swapaxes(-1, -2)
        if x.dtype != mx.float32 and mx.default_device() == mx.cpu:
            # MLX's CPU gather_mm is float32-only; Metal runs every dtype. Tests on CPU only.
            out = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32), lhs_indices=lhs, rhs_indices=indices,
                               sorted_indices=sorted_indices)
            return out.astype(x.dtype)
        return mx.gather_mm(x, w, lhs_indices=lhs, rhs_indices=indices, sorted_indices=sorted_indices)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedExpertLinear(self.weight, group_size, bits, mode)


class QuantizedExpertLinear(QuantizedWeights):
    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False, lhs=None) -> mx.array:
        return self.gather_matmul(x, indices, sorted_indices, lhs)


SORT_THRESHOLD = 64  # token-expert pairs from which dispatch sorts them by expert


def dispatch(x: mx.array, indices: mx.array, run) -> mx.array:
    """x (..., D), indices (..., k) -> (..., k, D), where `run(rows, indices, sorted)` computes
    each token-expert pair's output.

    With many pairs (prefill) the pairs are sorted by expert first so that each expert's matrix is
    read once per contiguous run instead of once per pair.
    """
    k = indices.shape[-1]
    lead = indices.shape[:-1]
    rows = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, D)
    sort = indices.size >= SORT_THRESHOLD
    if sort:
        flat = indices.flatten()
        order = mx.argsort(flat)
        rows = rows.reshape(-1, 1, x.shape[-1])[order // k]  # (N*k, 1, D) grouped by expert
        indices = flat[order]
    out = run(rows, indices, sort)
    if sort:
        out = out[mx.argsort(order)]
    return out.reshape(*lead, k, x.shape[-1])


class RoutedExperts(nn.Module):
    """SwiGLU experts as three stacked matrices, run through gather_mm / gather_qmm."""

    def __init__(self, dims: int, hidden: int, experts: int, limit: float = 0.0):
        super().__init__()
        self.limit = limit
        self.gate_proj = ExpertLinear(experts, dims, hidden)
        self.up_proj = ExpertLinear(experts, dims, hidden)
        self.down_proj = ExpertLinear(experts, hidden, dims)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (..., D), indices (..., k) -> (..., k, D): each chosen expert's output."""
        return dispatch(x, indices, self.swiglu)

    def swiglu(self, rows: mx.array, indices: mx.array, sorted_indices: bool) -> mx.array:
        # gate and up read the same rows: one index array for both, not one built in each call
        lhs = mx.arange(math.prod(rows.shape[:-2]), dtype=mx.uint32).reshape(rows.shape[:-2])
        h = swiglu(self.gate_proj(rows, indices, sorted_indices, lhs), self.up_proj(rows, indices, sorted_indices, lhs),
                   self.limit)
        return self.down_proj(h, indices, sorted_indices)


class MixedPrecisionExperts(nn.Module):
    """Routed experts quantized at per-expert bit widths (the expert-aware recipe of `convert`).

    gather_qmm takes one bit width per stack, so the experts of each width form their own stack
    (`bits4`, `bits2`, ...), experts in index order inside it. Every stack runs all of a step's
    token-expert pairs (shapes stay static, nothing waits on the router) and keeps the outputs of
    its own experts. Pairs of other stacks are pointed at an expert this stack already reads for
    the step, so they cost arithmetic and re-reads of weights likely still in cache, not fetches
    of other experts (decoding is bound by weight traffic).
    """

    def __init__(self, dims: int, hidden: int, expert_bits: list[int]):
        super().__init__()
        self.widths = sorted(set(expert_bits), reverse=True)
        order = sorted(range(len(expert_bits)), key=lambda e: (self.widths.index(expert_bits[e]), e))
        position = [0] * len(expert_bits)
        for p, e in enumerate(order):
            position[e] = p
        self._position = mx.array(position)  # expert index -> its row in the stacks laid end to end
        self._ranges, start = [], 0
        for b in self.widths:
            count = expert_bits.count(b)
            self[f"bits{b}"] = RoutedExperts(dims, hidden, count)
            self._ranges.append((start, start + count))
            start += count

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # Sorting by position keeps each stack's pairs contiguous and its local indices sorted.
        return dispatch(x, self._position[indices], self._run)

    def _run(self, rows: mx.array, positions: mx.array, sorted_indices: bool) -> mx.array:
        out = None
        for b, (lo, hi) in zip(self.widths, self._ranges):
            mine = (positions >= lo) & (positions < hi)
            # Clamping to the stack's first and last used rows keeps real pairs as they are, keeps
            # the order sorted, and sends other stacks' pairs to rows that are read anyway. With no
            # pair in this stack, first > last and every pair goes to its row 0.
            first = mx.where(mine, positions, hi).min()
            last = mx.where(mine, positions, lo).max()
            local = mx.minimum(mx.maximum(positions, first), last) - lo
            y = self[f"bits{b}"].swiglu(rows, local, sorted_indices)
            out = y if out is None else mx.where(mine[..., None, None], y, out)
        return out


def mix_experts(moe: nn.Module, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
    """The routed experts' outputs weighted and summed, plus the shared experts' (if the MoE has them)."""
    y = (moe.switch_mlp(x, indices) * weights[..., None]).sum(axis=-2).astype(x.dtype)
    if "shared_experts" in moe:
        y = y + moe.shared_experts(x)
    return y


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = Router(args)
        # Named as mlx-lm names it, so mlx-lm's converted folders load without renaming.
        self.switch_mlp = RoutedExperts(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts)
        if args.n_shared_experts:
            self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)

    def __call__(self, x: mx.array) -> mx.array:
        return mix_experts(self, x, *self.gate(x))
