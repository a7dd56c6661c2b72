"""`V4Args`: the shape of a DeepSeek-V4 network (Flash, Pro), from its config.json.

Two spellings of the same model are read to the same arguments:
- DeepSeek's published keys: `compress_ratios` (one entry per layer plus one for the MTP block:
  0 = sliding window only, 4 = CSA, 128 = HCA), `num_hash_layers`, `rope_scaling`,
  `compress_rope_theta`;
- transformers 5 (`save_pretrained`): `layer_types` (sliding_attention, compressed_sparse_attention,
  heavily_compressed_attention), `compress_rates`, `mlp_layer_types` (hash_moe, moe) and
  `rope_parameters` = {"main": plain RoPE at rope_theta, "compress": YaRN at compress_rope_theta}.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import ConfigError

LAYER_TYPES = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")

REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
            "o_groups", "o_lora_rank", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")


@dataclass
class V4Args:
    model_type: str                      # deepseek_v4
    vocab_size: int
    hidden_size: int                     # width of each of the hc_mult residual streams
    num_hidden_layers: int               # main blocks; the MTP block comes after them
    num_attention_heads: int             # query heads; keys and values are one shared head (MQA)
    head_dim: int                        # 512: the shared key=value head, and each query head
    q_lora_rank: int                     # queries go through a low-rank latent (wq_a -> norm -> wq_b)
    o_groups: int                        # the output projection is grouped: heads in o_groups groups ...
    o_lora_rank: int                     # ... each projected to o_lora_rank, then mixed by wo_b
    moe_intermediate_size: int           # hidden width of one routed (and the shared) expert
    n_routed_experts: int
    num_experts_per_tok: int             # k of the top-k routing (and the width of tid2eid)
    compress_ratios: list[int] = field(default_factory=list)  # per layer (+ MTP block): 0, 4 or 128
    qk_rope_head_dim: int = 64           # RoPE on the LAST qk_rope_head_dim dims of each head
    sliding_window: int = 128            # every layer attends to its last sliding_window tokens
    n_shared_experts: int = 1
    num_hash_layers: int = 0             # the first num_hash_layers layers route by token id (tid2eid)
    scoring_func: str = "sqrtsoftplus"   # router scores: sqrt(softplus(x . W))
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    swiglu_limit: float = 0.0            # clamp of the SwiGLU inputs (0: none)
    index_n_heads: int = 64              # the lightning indexer of CSA layers
    index_head_dim: int = 128
    index_topk: int = 512                # compressed entries each query of a CSA layer attends to
    hc_mult: int = 4                     # hyper-connection residual streams per token
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0          # sliding-only layers and the MTP block: plain RoPE
    compress_rope_theta: float = 160000.0  # compressed layers and their indexers: YaRN on this base
    rope_scaling: Optional[dict] = None  # YaRN (compressed layers only), no mscale
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 0    # MTP blocks stored as mtp.0.*
    tie_word_embeddings: bool = False

    family = "deepseek_v4"

    def compress_ratio(self, layer: int) -> int:
        """0 (sliding window only), 4 (CSA: overlapping windows + indexer) or 128 (HCA); layer
        num_hidden_layers is the MTP block."""
        return self.compress_ratios[layer]

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "V4Args":
        missing = [k for k in REQUIRED if config.get(k) is None]
        if missing:
            raise ConfigError(f"config.json (deepseek_v4): missing required field(s) {missing}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in fields and v is not None}
        values["compress_ratios"] = _read_ratios(config)
        if "num_hash_layers" not in config and config.get("mlp_layer_types"):
            values["num_hash_layers"] = _read_hash_layers(config["mlp_layer_types"])
        rope = config.get("rope_parameters") or {}
        if isinstance(rope.get("main"), dict):  # transformers 5 nesting
            values["rope_theta"] = rope["main"].get("rope_theta", values.get("rope_theta", 10000.0))
            compress = rope.get("compress") or {}
            values["compress_rope_theta"] = compress.get("rope_theta", values.get("compress_rope_theta", 160000.0))
            scaling = compress if compress.get("rope_type", compress.get("type")) == "yarn" else None
        else:
            scaling = config.get("rope_scaling")
            if scaling and scaling.get("rope_type", scaling.get("type", "yarn")) != "yarn":
                raise ConfigError(f"config.json: rope_scaling type {scaling.get('type')!r} is not supported "
                                  "(DeepSeek-V4 uses 'yarn')")
        values["rope_scaling"] = _yarn(scaling)
        args = cls(**values)
        args.validate()
        return args

    def validate(self) -> None:
        def fail(name, expected):
            raise ConfigError(f"config.json: {name}={getattr(self, name)!r} is not valid: expected {expected}")

        for name in REQUIRED:
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "a positive integer")
        if len(self.compress_ratios) < self.num_hidden_layers:
            raise ConfigError(f"config.json: compress_ratios has {len(self.compress_ratios)} entries; expected "
                              f"num_hidden_layers + 1 = {self.num_hidden_layers + 1} (one per layer, then the "
                              "MTP block)")
        bad = sorted({r for r in self.compress_ratios if not isinstance(r, int) or r < 0 or r == 1})
        if bad:
            fail("compress_ratios", f"entries 0 (sliding only), 4 (CSA) or another ratio >= 2 (HCA: 128), not {bad}")
        if self.num_attention_heads % self.o_groups:
            fail("o_groups", f"a divisor of num_attention_heads={self.num_attention_heads}")
        if not 0 < self.qk_rope_head_dim <= self.head_dim or self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", f"an even number up to head_dim={self.head_dim}")
        if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
            fail("num_experts_per_tok", f"between 1 and n_routed_experts={self.n_routed_experts}")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"one of {SCORING_FUNCS}")
        if not 0 <= self.num_hash_layers <= self.num_hidden_layers:
            fail("num_hash_layers", f"between 0 and num_hidden_layers={self.num_hidden_layers}")
        if self.sliding_window <= 0:
            fail("sliding_window", "a positive integer")
        if self.n_shared_experts not in (0, 1):
            fail("n_shared_experts", "0 or 1 (DeepSeek-V4 has one shared expert)")


def _read_ratios(config: dict) -> list[int]:
    n = config["num_hidden_layers"]
    if config.get("compress_ratios") is not None:
        ratios = config["compress_ratios"]
        if not isinstance(ratios, list) or not all(isinstance(r, int) for r in ratios):
            raise ConfigError("config.json: compress_ratios must be a list of integers (0, 4 or 128)")
        if len(ratios) not in (n, n + 1):
            raise ConfigError(f"config.json: compress_ratios has {len(ratios)} entries; expected "
                              f"num_hidden_layers + 1 = {n + 1} (one per layer, then the MTP block)")
        return list(ratios) + ([0] if len(ratios) == n else [])
    types = config.get("layer_types")
    if types is None:
        raise ConfigError("config.json (deepseek_v4): neither compress_ratios nor layer_types says which layers "
                          "compress their keys")
    rates = {**LAYER_TYPES, **{k: v for k, v in (config.get("compress_rates") or {}).items()}}
    unknown = sorted({t for t in types if t not in rates})
    if unknown or len(types) != n:
        raise ConfigError(f"config.json: layer_types must list {n} entries from {sorted(LAYER_TYPES)}; "
                          f"got {len(types)} entries" + (f", unknown {unknown}" if unknown else ""))
    return [rates[t] for t in types] + [0]  # transformers has no MTP block: it is sliding-only


def _read_hash_layers(types: list) -> int:
    n = sum(1 for t in types if t == "hash_moe")
    if types[:n] != ["hash_moe"] * n:
        raise ConfigError("config.json: mlp_layer_types must put every hash_moe layer first")
    return n


def _yarn(scaling: Optional[dict]) -> Optional[dict]:
    if not scaling:
        return None
    for key in ("factor", "original_max_position_embeddings"):
        if key not in scaling:
            raise ConfigError(f"config.json: rope_scaling (yarn) is missing {key!r}")
    return {k: scaling[k] for k in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
            if k in scaling}
