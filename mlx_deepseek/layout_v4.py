"""DeepSeek-V4 checkpoint names -> our module names (the V4 twin of layout.py's mapping).

Our modules use the names of DeepSeek's published checkpoint (`layers.N.attn.wq_a`, ...), with
three differences: routed experts are stacked (`ffn.switch_mlp.{gate,up,down}_proj`, from
`ffn.experts.E.{w1,w3,w2}`), the shared expert's w1/w3/w2 are `gate/up/down_proj`, and the
hyper-connection tensors are modules (`hc_attn.fn` for `hc_attn_fn`). The grouped output
projection `wo_a` (groups * o_lora_rank, in) is held per group, (groups, o_lora_rank, in).

Also read, mapped by table: the transformers 5 module layout (`model.layers.N.self_attn.q_a_proj`,
`mlp.experts.gate_up_proj` stacked and fused, `attn_hc`, the indexer nested in the compressor, ...)
and what its `save_pretrained` writes (DeepSeek's names under `model.`, `attn.norm` for kv_norm,
`model.embed_tokens`, `model.hc_head.hc_fn`).
"""

from __future__ import annotations

import re
import mlx.core as mx

from .layout import CheckpointError
from .models.deepseek_v4.config import V4Args

NATIVE_EXPERT = re.compile(r"^((?:layers\.\d+|mtp\.\d+)\.ffn)\.experts\.(\d+)\.(w1|w2|w3)\.(weight|scales|biases)$")
W_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
HC = re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$")

# transformers 5 -> native, applied in order to the name after `model.` (first match wins)
HF_RENAMES = [
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.self_attn\.", ".attn."),
    (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
    (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
    (r"\.attn\.o_b_proj\.", ".attn.wo_b."),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"compressor\.kv_proj\.", "compressor.wkv."),
    (r"compressor\.gate_proj\.", "compressor.wgate."),
    (r"compressor\.position_bias$", "compressor.ape"),
    (r"compressor\.kv_norm\.", "compressor.norm."),
    (r"\.mlp\.gate\.e_score_correction_bias$", ".ffn.gate.bias"),
    (r"\.mlp\.", ".ffn."),
    # what transformers' save_pretrained writes back: DeepSeek's names under `model.`, except the
    # attention's kv_norm, which comes out as `attn.norm` (its reverse mapping of compressor.norm)
    (r"\.attn\.norm\.", ".attn.kv_norm."),
]


def is_hf_layout(names) -> bool:
    return any(n.startswith("model.") or n.startswith("lm_head.") for n in names)


def hf_to_native(name: str) -> str:
    if name.startswith("model."):
        name = name[len("model."):]
    for pattern, repl in HF_RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def is_v4_mtp_tensor(name: str) -> bool:
    return name.startswith("mtp.")


def to_v4_layout(weights: dict[str, mx.array], args: V4Args, keep_mtp: bool = False) -> dict[str, mx.array]:
    """Rename and reshape V4 checkpoint tensors (native or transformers layout) into our modules, lazily."""
    if is_hf_layout(weights):
        weights = hf_native_names(weights)
    out: dict[str, mx.array] = {}
    experts: dict[str, dict[int, mx.array]] = {}
    for name, value in weights.items():
        if is_v4_mtp_tensor(name):
            if not keep_mtp or not name.startswith("mtp.0."):
                continue
        m = NATIVE_EXPERT.match(name)
        if m:
            prefix, index, w, part = m.groups()
            experts.setdefault(f"{prefix}.switch_mlp.{W_NAMES[w]}.{part}", {})[int(index)] = value
            continue
        out[_module_name(name)] = value
    for name, by_index in experts.items():
        missing = [e for e in range(args.n_routed_experts) if e not in by_index]
        if missing:
            stem = name.replace("switch_mlp", "experts.{E}")
            raise CheckpointError(f"tensor {stem}: expected experts 0..{args.n_routed_experts - 1}, missing "
                                  f"{missing[:8]}{'...' if len(missing) > 8 else ''}")
        first = tuple(by_index[0].shape)
        odd = [e for e in range(args.n_routed_experts) if tuple(by_index[e].shape) != first]
        if odd:
            raise CheckpointError(f"tensor {name.replace('switch_mlp', f'experts.{odd[0]}')} has shape "
                                  f"{tuple(by_index[odd[0]].shape)}, expected {first} like expert 0")
        out[_module_name(name)] = mx.stack([by_index[e] for e in range(args.n_routed_experts)])
    for name in [n for n in out if n.endswith(".attn.wo_a.weight") or ".attn.wo_a." in n]:
        w = out[name]
        if w.ndim == 2:
            if w.shape[0] % args.o_groups:
                raise CheckpointError(f"tensor {name}: {w.shape[0]} rows do not split into o_groups={args.o_groups}")
            out[name] = w.reshape(args.o_groups, w.shape[0] // args.o_groups, w.shape[1])
    for name in [n for n in out if n.endswith("ffn.gate.tid2eid")]:
        out[name] = out[name].astype(mx.int32)
    return out


def _module_name(name: str) -> str:
    """A native name -> our module path."""
    name = HC.sub(lambda m: f"{m.group(1)}hc_{m.group(2)}.{m.group(3)}", name)
    name = re.sub(r"\.shared_experts\.w([123])\.", lambda m: f".shared_experts.{W_NAMES['w' + m.group(1)]}.", name)
    if name.startswith("mtp.0."):
        rest = name[len("mtp.0."):]
        top = ("e_proj.", "h_proj.", "enorm.", "hnorm.", "norm.", "hc_head.")
        name = "mtp." + (rest if rest.startswith(top) else "block." + rest)
    return name


def hf_native_names(weights: dict) -> dict:
    """transformers 5 names -> native names; its fused, stacked experts -> one tensor per expert
    (works on mx and numpy arrays alike)."""
    out: dict[str, mx.array] = {}
    for name, value in weights.items():
        if name.endswith("rotary_emb.inv_freq") or "_original_inv_freq" in name:
            continue
        native = hf_to_native(name)
        m = re.match(r"^(layers\.\d+\.ffn)\.experts\.(gate_up_proj|down_proj)$", native)
        if m:
            prefix, kind = m.groups()
            for e in range(value.shape[0]):
                if kind == "gate_up_proj":
                    half = value.shape[1] // 2
                    out[f"{prefix}.experts.{e}.w1.weight"] = value[e, :half]
                    out[f"{prefix}.experts.{e}.w3.weight"] = value[e, half:]
                else:
                    out[f"{prefix}.experts.{e}.w2.weight"] = value[e]
            continue
        native = re.sub(r"\.shared_experts\.(gate|up|down)_proj\.",
                        lambda m: {"gate": ".shared_experts.w1.", "up": ".shared_experts.w3.",
                                   "down": ".shared_experts.w2."}[m.group(1)], native)
        out[native] = value
    return out

