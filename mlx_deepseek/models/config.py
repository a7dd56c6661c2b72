"""`ModelArgs`: the shape of a DeepSeek MLA + MoE network, read from a Hugging Face config.json.

One dataclass covers both families: `deepseek_v2` (V2, V2-Lite, V2.5, Coder-V2) and
`deepseek_v3` (V3, R1, V3.1, Moonlight), plus `kimi_k2`, which is a deepseek_v3 network, and
`deepseek_v32` (V3.2, V3.2-Exp, V3.2-Speciale): V3 plus DeepSeek Sparse Attention, whose lightning
indexer is described by `index_n_heads`, `index_head_dim` and `index_topk` (see `indexer.py`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

FAMILIES = {"deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3", "kimi_k2": "deepseek_v3",
            "deepseek_v32": "deepseek_v3"}

# DeepSeek Sparse Attention: required for deepseek_v32, meaningless elsewhere.
SPARSE_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")

# The router each family uses when config.json does not say (the published configs always do).
FAMILY_ROUTER_DEFAULTS = {
    "deepseek_v2": {"topk_method": "greedy", "scoring_func": "softmax"},
    "deepseek_v3": {"topk_method": "noaux_tc", "scoring_func": "sigmoid"},
}

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")

REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)


class ConfigError(ValueError):
    """config.json describes something we cannot build (names the field and what was expected)."""


@dataclass
class ModelArgs:
    model_type: str                     # as in config.json: deepseek_v2, deepseek_v3 or kimi_k2
    vocab_size: int
    hidden_size: int                    # residual stream width
    intermediate_size: int              # hidden width of the dense MLP (first_k_dense_replace layers)
    num_hidden_layers: int              # main layers; an MTP layer, if any, has index num_hidden_layers
    num_attention_heads: int
    kv_lora_rank: int                   # width of the compressed KV latent that the cache stores
    qk_nope_head_dim: int               # per-head query/key width without position (from the latent)
    qk_rope_head_dim: int               # per-token shared RoPE key width (also cached)
    v_head_dim: int                     # per-head value width
    q_lora_rank: Optional[int] = None   # None: queries are one projection (V2-Lite)
    moe_intermediate_size: int = 0      # hidden width of one routed (and one shared) expert
    n_routed_experts: Optional[int] = None  # None: a dense model, every layer an MLP
    n_shared_experts: int = 0           # shared experts, fused into one MLP of n times the width
    num_experts_per_tok: int = 1        # k of the top-k routing
    topk_method: str = "greedy"         # greedy | group_limited_greedy | noaux_tc
    scoring_func: str = "softmax"       # softmax | sigmoid
    n_group: int = 1                    # experts are split in n_group groups ...
    topk_group: int = 1                 # ... and a token may only use topk_group of them
    norm_topk_prob: bool = False        # renormalize the k chosen weights to sum to one
    routed_scaling_factor: float = 1.0  # multiplies the routed weights
    first_k_dense_replace: int = 0      # the first k layers use the dense MLP
    moe_layer_freq: int = 1             # after those, every moe_layer_freq-th layer is MoE
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # YaRN parameters, or None for plain RoPE
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0   # multi-token-prediction layers stored after the main ones
    index_n_heads: Optional[int] = None   # deepseek_v32: the lightning indexer's query heads ...
    index_head_dim: Optional[int] = None  # ... and their width (its one key per token has it too)
    index_topk: Optional[int] = None      # tokens each query attends to past that many (None: dense)

    @property
    def family(self) -> str:
        return FAMILIES[self.model_type]

    @property
    def sparse(self) -> bool:
        """DeepSeek Sparse Attention (V3.2): a lightning indexer picks the tokens each query reads."""
        return self.index_topk is not None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.n_routed_experts is not None
            and i >= self.first_k_dense_replace
            and i % self.moe_layer_freq == 0
        )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "ModelArgs":
        if not isinstance(config, dict):
            raise ConfigError(f"config.json: a JSON {type(config).__name__}, expected an object")
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or model_type not in FAMILIES:
            raise ConfigError(
                f"config.json: model_type {model_type!r} is not supported; "
                f"expected one of {sorted(FAMILIES)}"
            )
        missing = [k for k in REQUIRED if config.get(k) is None]
        if model_type == "deepseek_v32":
            missing += [k for k in SPARSE_FIELDS + ("q_lora_rank",) if config.get(k) is None]
        if missing:
            raise ConfigError(f"config.json ({model_type}): missing required field(s) {missing}")

        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in fields and v is not None}
        if model_type != "deepseek_v32":
            values = {k: v for k, v in values.items() if k not in SPARSE_FIELDS}
        check_types(values)
        for key, default in FAMILY_ROUTER_DEFAULTS[FAMILIES[model_type]].items():
            values.setdefault(key, default)
        values["rope_theta"], values["rope_scaling"] = _read_rope(config)
        args = cls(**values)
        args.validate()
        return args

    def validate(self) -> None:
        def fail(field, expected):
            raise ConfigError(
                f"config.json: {field}={getattr(self, field)!r} is not valid: expected {expected}"
            )

        for field in REQUIRED:
            if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
                fail(field, "a positive integer")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "an even number (RoPE rotates pairs)")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            fail("q_lora_rank", "a positive integer or null")
        if self.sparse:
            for field in SPARSE_FIELDS:
                if getattr(self, field) <= 0:
                    fail(field, "a positive integer")
            if self.index_head_dim < self.qk_rope_head_dim:
                fail("index_head_dim", f"at least qk_rope_head_dim={self.qk_rope_head_dim} (its first "
                                       "qk_rope_head_dim features are rotated)")
        if self.n_routed_experts is None:
            return
        if self.moe_intermediate_size <= 0:
            fail("moe_intermediate_size", "a positive integer for an MoE model")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"one of {TOPK_METHODS}")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"one of {SCORING_FUNCS}")
        if self.n_group <= 0 or self.n_routed_experts % self.n_group:
            fail("n_group", f"a divisor of n_routed_experts={self.n_routed_experts}")
        if not 0 < self.topk_group <= self.n_group:
            fail("topk_group", f"between 1 and n_group={self.n_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_method != "greedy" and self.n_group > 1:
            reachable = self.topk_group * per_group
        else:
            reachable = self.n_routed_experts
        if not 0 < self.num_experts_per_tok <= reachable:
            fail("num_experts_per_tok", f"between 1 and {reachable} (experts a token can reach)")
        if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
            fail("n_group", "at most n_routed_experts/2 (noaux_tc scores a group by its top two)")
        if self.moe_layer_freq <= 0:
            fail("moe_layer_freq", "a positive integer")


# Field kinds beyond REQUIRED (positive integers); a dimension beyond 2^22 is no DeepSeek model.
COUNTS = ("moe_intermediate_size", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers",
          "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq", "max_position_embeddings",
          "q_lora_rank", "n_routed_experts") + SPARSE_FIELDS
REALS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")
FLAGS = ("norm_topk_prob", "attention_bias", "tie_word_embeddings")
NAMES = ("model_type", "topk_method", "scoring_func")
LARGEST = 2**22


def check_types(values: dict) -> None:
    """Every field read from config.json of the type it must have, in a sane range (not a string
    where a number goes, not a bool for a count, no size that would ask for absurd memory)."""
    def fail(field, expected):
        raise ConfigError(f"config.json: {field}={values[field]!r} is not valid: expected {expected}")

    for field in REQUIRED + COUNTS:
        if field in values:
            v = values[field]
            if type(v) is not int or v < 0 or v > (2**31 - 1 if field == "max_position_embeddings" else LARGEST):
                fail(field, f"an integer between 0 and {LARGEST}")
    for field in REALS:
        if field in values and not _real(values[field]):
            fail(field, "a finite number")
    for field in FLAGS:
        if field in values and type(values[field]) is not bool:
            fail(field, "true or false")
    for field in NAMES:
        if field in values and not isinstance(values[field], str):
            fail(field, "a string")
    if "rope_scaling" in values and not isinstance(values["rope_scaling"], dict):
        fail("rope_scaling", "an object or null")
    if "rope_parameters" in values and not isinstance(values["rope_parameters"], dict):
        fail("rope_parameters", "an object or null")
    if values.get("rms_norm_eps", 1.0) <= 0:
        fail("rms_norm_eps", "a positive number")


def _real(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _read_rope(config: dict) -> tuple[float, Optional[dict]]:
    """DeepSeek's configs say `rope_theta` + `rope_scaling`; transformers 5 writes `rope_parameters`."""
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: rope_parameters={params!r} is not valid: expected an object")
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    if not _real(theta) or theta <= 0 or theta == 1:
        raise ConfigError(f"config.json: rope_theta={theta!r} is not valid: expected a positive number other than 1")
    scaling = config.get("rope_scaling") or (params if params else None)
    if scaling is None:
        return float(theta), None
    if not isinstance(scaling, dict):
        raise ConfigError(f"config.json: rope_scaling={scaling!r} is not valid: expected an object or null")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise ConfigError(
            f"config.json: rope_scaling type {kind!r} is not supported; DeepSeek models use 'yarn'"
        )
    for key in ("factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise ConfigError(f"config.json: rope_scaling (yarn) is missing {key!r}")
    keep = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")
    for key in keep:
        value = scaling.get(key)
        positive = key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
        if value is not None and not (_real(value) and (value > 0 if positive else True)):
            raise ConfigError(f"config.json: rope_scaling {key}={value!r} is not valid: expected a "
                              f"{'positive' if positive else 'finite'} number")
    return float(theta), {k: scaling[k] for k in keep if k in scaling}
