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

And the MLX folders of mlx-lm's DeepSeek-V4 ports (`port_to_native`), so they load as they are:
- mlx-lm PR #1189's branch (e.g. mlx-community/DeepSeek-V4-Flash-4bit), PR #1797's (nh13/mlx-lm,
  the same names without MTP) and PR #1192's (Blaizzy, `attn_hc`): mlx-lm module names
  (`model.embed_tokens`, `lm_head`, `model.layers.N.attn.*` as DeepSeek names them, experts stacked
  as `ffn.switch_mlp.{gate,up,down}_proj`, `ffn.gate.e_score_correction_bias`, hyper-connections as
  `hc_attn.fn` or `attn_hc.fn`, `model.hc_head.fn`, `wo_a` flat (groups * o_lora_rank, in),
  the MTP block as `mtp.0.block.*` / `mtp.0.{e_proj,...,hc_head.fn}`), quantized or not;
- folders that keep DeepSeek's names quantized (affine): `embed.*`, `head.*`, pre-stacked experts
  `layers.N.ffn.experts.w{1,2,3}.{weight,scales,biases}`, `wo_a` per group (`attn.wo_a.G.*`) or
  already (groups, o_lora_rank, in).
A name none of these explain ends as an unexpected tensor, named, when the shapes are checked.
"""

from __future__ import annotations

import re
from typing import Optional

import mlx.core as mx

from .layout import CheckpointError, stack_experts
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
    (r"\.(mlp|ffn)\.gate\.e_score_correction_bias$", ".ffn.gate.bias"),
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


def is_mtp_copy(name: str) -> bool:
    """An MTP block's own copy of the embedding or head (DeepSeek's convert.py drops them: the MTP
    block shares the main ones)."""
    return re.match(r"^mtp\.\d+\.(emb|embed|head)\.", name) is not None


def to_v4_layout(weights: dict[str, mx.array], args: V4Args, keep_mtp: bool = False) -> dict[str, mx.array]:
    """Rename and reshape V4 checkpoint tensors (native or transformers layout) into our modules, lazily."""
    if is_hf_layout(weights):
        weights = hf_native_names(weights)
    weights = port_to_native(weights, args)
    out: dict[str, mx.array] = {}
    experts: dict[str, dict[int, mx.array]] = {}
    for name, value in weights.items():
        if is_v4_mtp_tensor(name):
            if not keep_mtp or re.match(r"^mtp\.[1-9]\d*\.", name) or is_mtp_copy(name):  # first block only
                continue
        m = NATIVE_EXPERT.match(name)
        if m:
            prefix, index, w, part = m.groups()
            experts.setdefault(f"{prefix}.switch_mlp.{W_NAMES[w]}.{part}", {})[int(index)] = value
            continue
        out[_module_name(name)] = value
    for name, by_index in experts.items():
        out[_module_name(name)] = stack_experts(name, by_index, args.n_routed_experts)
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
        top = ("e_proj.", "h_proj.", "enorm.", "hnorm.", "norm.", "hc_head.", "block.")
        name = "mtp." + (rest if rest.startswith(top) else "block." + rest)
    return name


def v4_module_name(native: str) -> tuple[str, Optional[int]]:
    """A native (published) tensor name -> (our tensor name, expert index or None); routed experts
    of one layer and projection share a name and are stacked in expert order."""
    m = NATIVE_EXPERT.match(native)
    if m:
        prefix, index, w, part = m.groups()
        return _module_name(f"{prefix}.switch_mlp.{W_NAMES[w]}.{part}"), int(index)
    return _module_name(native), None


PRESTACKED = re.compile(r"^((?:layers\.\d+|mtp\.\d+)\.ffn)\.experts\.(w1|w2|w3)\.(weight|scales|biases)$")
GROUPED_WO_A = re.compile(r"^((?:layers\.\d+|mtp\.\d+)\.attn\.wo_a)\.(\d+)\.(weight|scales|biases)$")


def port_to_native(weights: dict, args: V4Args) -> dict:
    """What mlx-lm's ports and quantized DeepSeek-named folders store differently -> native names
    (or ours where native has none: stacked experts, grouped wo_a)."""
    if not any(PRESTACKED.match(n) or GROUPED_WO_A.match(n) for n in weights):
        return weights
    out, groups = {}, {}
    for name, value in weights.items():
        m = PRESTACKED.match(name)
        if m:
            out[f"{m.group(1)}.switch_mlp.{W_NAMES[m.group(2)]}.{m.group(3)}"] = value
            continue
        m = GROUPED_WO_A.match(name)
        if m:
            groups.setdefault(f"{m.group(1)}.{m.group(3)}", {})[int(m.group(2))] = value
            continue
        out[name] = value
    for name, by_group in groups.items():
        missing = [g for g in range(args.o_groups) if g not in by_group]
        if missing:
            raise CheckpointError(f"tensor {name.replace('wo_a.', 'wo_a.{G}.')}: expected groups "
                                  f"0..{args.o_groups - 1}, missing {missing}")
        out[name] = mx.stack([by_group[g] for g in range(args.o_groups)])
    return out


def port_module_names(path: str) -> list[str]:
    """Our module path -> the names the ports' config.json may give it (its `quantization` keys)."""
    names = []
    m = re.match(r"^mtp\.(.*)$", path)
    if m:
        names.append(f"mtp.0.{m.group(1)}")
        if m.group(1).startswith("block."):  # DeepSeek's names have no `block`
            names.append(f"mtp.0.{m.group(1)[len('block.'):]}")
    elif path == "embed":
        names.append("model.embed_tokens")
    elif path == "head":
        names.append("lm_head")
    elif path.startswith("layers."):
        names.append("model." + path)
    for name in [path] + names:
        stacked = re.sub(r"\.ffn\.switch_mlp\.(gate|up|down)_proj$",
                         lambda m: f".ffn.experts.{ {'gate': 'w1', 'up': 'w3', 'down': 'w2'}[m.group(1)]}", name)
        if stacked != name:
            names.append(stacked)
    return names


HF_FUSED = re.compile(r"^(layers\.\d+\.ffn)\.experts\.(gate_up_proj|down_proj)$")


def hf_native_views(shapes: dict[str, tuple]) -> dict[str, tuple[str, Optional[tuple[int, int, int]]]]:
    """transformers 5 names (with their shapes) -> {native name: (its name, part)}; `part` is
    (expert, first row, end row) of a fused, stacked expert tensor, None for a whole tensor."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith("rotary_emb.inv_freq") or "_original_inv_freq" in name:
            continue
        native = hf_to_native(name)
        m = HF_FUSED.match(native)
        if m:
            prefix, kind = m.groups()
            for e in range(shape[0]):
                if kind == "gate_up_proj":
                    half = shape[1] // 2
                    out[f"{prefix}.experts.{e}.w1.weight"] = (name, (e, 0, half))
                    out[f"{prefix}.experts.{e}.w3.weight"] = (name, (e, half, shape[1]))
                else:
                    out[f"{prefix}.experts.{e}.w2.weight"] = (name, (e, 0, shape[1]))
            continue
        native = re.sub(r"\.shared_experts\.(gate|up|down)_proj\.",
                        lambda m: {"gate": ".shared_experts.w1.", "up": ".shared_experts.w3.",
                                   "down": ".shared_experts.w2."}[m.group(1)], native)
        out[native] = (name, None)
    return out


def hf_native_names(weights: dict) -> dict:
    """transformers 5 names -> native names; its fused, stacked experts -> one tensor per expert
    (works on mx and numpy arrays alike)."""
    views = hf_native_views({k: tuple(v.shape) for k, v in weights.items()})
    return {native: weights[name] if part is None else weights[name][part[0], part[1] : part[2]]
            for native, (name, part) in views.items()}
