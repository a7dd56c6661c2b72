"""Which bits each module gets: a default (`-q`, `--q-bits`, `--q-group-size`, `--q-mode`) and a
recipe that overrides it by module kind, by name (`--recipe mixed-3-6`) or as rules
(`--recipe "routed_experts=3,attention=6,embed=8"`, optionally `kind=bits:group_size:mode`,
or `kind=none` to keep a kind unquantized)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

MODES = {"affine": (None, (2, 3, 4, 5, 6, 8)), "mxfp4": (32, (4,)), "nvfp4": (16, (4,)), "mxfp8": (32, (8,))}
GROUP_SIZES = (32, 64, 128)

# A stack of the experts quantized at one width (the expert-aware recipe).
WIDTH_STACK = re.compile(r"\.switch_mlp\.bits(\d+)\.")

# Module kinds, from the output module path (DeepSeek-V2/V3 names, and DeepSeek-V4's: `embed`,
# `head`, `layers.N.attn.*`, `layers.N.ffn.*`, `mtp.*`). Routers, norms, the correction bias and
# V4's hyper-connections, sinks, window biases (ape) and tid2eid are in no kind: never quantized; nor
# are V3.2's indexer head weights (`weights_proj`) and key norm, which it computes in float32.
KINDS = {
    "embed": re.compile(r"((^|\.)embed_tokens|^embed)$"),
    "head": re.compile(r"(^lm_head|shared_head\.head|^head)$"),
    "attention": re.compile(r"\.self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|embed_q|unembed_out|o_proj)$"
                           r"|\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)$"),
    "compressor": re.compile(r"\.attn\.(indexer\.)?compressor\.(wkv|wgate)$"),   # V4: pooling of keys
    "indexer": re.compile(r"\.attn\.indexer\.(wq_b|weights_proj)$"             # V4: CSA's top-k scorer
                          r"|\.self_attn\.indexer\.(wq_b|wk)$"),                  # V3.2: its query, key
    "routed_experts": re.compile(r"\.(mlp|ffn)\.switch_mlp\.(bits\d+\.)?(gate_proj|up_proj|down_proj)$"),
    "shared_experts": re.compile(r"\.(mlp|ffn)\.shared_experts\.(gate_proj|up_proj|down_proj)$"),
    "dense_mlp": re.compile(r"\.mlp\.(gate_proj|up_proj|down_proj)$"),
    "mtp_projection": re.compile(r"\.eh_proj$|^mtp\.(e_proj|h_proj)$"),
}

# DeepSeek-V4 without -q/--q-bits/--recipe: routed experts as shipped (FP4 = mxfp4, carried over
# byte for byte), everything else quantizable at 8 bits.
V4_DEFAULT = "routed_experts=4:32:mxfp4"

RECIPES = {
    "mixed-2-6": "routed_experts=2,attention=6,shared_experts=6,dense_mlp=6,embed=8,head=8",
    "mixed-3-6": "routed_experts=3,attention=6,shared_experts=6,dense_mlp=6,embed=8,head=8",
    "mixed-4-6": "routed_experts=4,attention=6,shared_experts=6,dense_mlp=6,embed=8,head=8",
    "mixed-4-8": "routed_experts=4,attention=8,shared_experts=8,dense_mlp=8,embed=8,head=8",
}


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Quant:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_config(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def validate(self, where: str) -> "Quant":
        fixed_group, bits = MODES.get(self.mode, (None, None))
        if bits is None:
            available = [m for m in MODES if _mode_available(m)]
            raise RecipeError(f"{where}: quantization mode {self.mode!r} is not supported; expected one of {available}")
        if self.bits not in bits:
            raise RecipeError(f"{where}: {self.mode} quantization takes bits {list(bits)}, got {self.bits}")
        if fixed_group and self.group_size != fixed_group:
            raise RecipeError(f"{where}: {self.mode} quantization needs group size {fixed_group}, got {self.group_size}")
        if not fixed_group and self.group_size not in GROUP_SIZES:
            raise RecipeError(f"{where}: group size must be one of {list(GROUP_SIZES)}, got {self.group_size}")
        return self


def _mode_available(mode: str) -> bool:
    try:
        mx.quantize(mx.zeros((1, 64)), MODES[mode][0] or 64, MODES[mode][1][0], mode=mode)
        return True
    except (ValueError, RuntimeError):
        return False


def kind_of(module: str) -> Optional[str]:
    for kind, pattern in KINDS.items():
        if pattern.search(module):
            return kind
    return None


class Recipe:
    """module path -> Quant or None (kept in the output dtype).

    `expert_bits` ({"model.layers.L.mlp.switch_mlp": bits per expert}) splits those layers' experts
    into one stack per width, `switch_mlp.bits{B}.*`, with the routed experts' group size and mode.
    """

    def __init__(self, default: Optional[Quant], spec: Optional[str] = None):
        self.default = default.validate("--q-bits/--q-group-size/--q-mode") if default else None
        self.rules: dict[str, Optional[Quant]] = {}
        self.expert_bits: dict[str, list[int]] = {}
        if spec:
            self._parse(RECIPES.get(spec, spec))

    def _parse(self, spec: str) -> None:
        base = self.default or Quant(4, 64)
        for rule in filter(None, (r.strip() for r in spec.split(","))):
            kind, eq, value = rule.partition("=")
            kind = kind.strip()
            if not eq or kind not in KINDS:
                raise RecipeError(
                    f"--recipe: {rule!r} is not a rule; expected KIND=BITS[:GROUP_SIZE[:MODE]] with KIND one of "
                    f"{list(KINDS)}, or a recipe name from {list(RECIPES)}"
                )
            if value.strip() == "none":
                self.rules[kind] = None
                continue
            parts = value.split(":")
            try:
                q = Quant(int(parts[0]), int(parts[1]) if len(parts) > 1 else base.group_size,
                          parts[2] if len(parts) > 2 else base.mode)
            except ValueError:
                raise RecipeError(f"--recipe: {rule!r}: bits and group size must be integers") from None
            if len(parts) <= 2 and MODES[q.mode][0] and q.bits not in MODES[q.mode][1]:
                q = Quant(q.bits, 64 if len(parts) == 1 else q.group_size, "affine")  # e.g. 8 bits beside mxfp4
            self.rules[kind] = q.validate(f"--recipe {kind}")

    def __call__(self, module: str) -> Optional[Quant]:
        stack = WIDTH_STACK.search(module)
        if stack:
            base = self(module[: stack.start()] + ".switch_mlp." + module[stack.end():])
            return Quant(int(stack.group(1)), base.group_size, base.mode)
        kind = kind_of(module)
        if kind is None:
            return None
        return self.rules[kind] if kind in self.rules else self.default
