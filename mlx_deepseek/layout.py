"""Checkpoint tensor names -> our module names: the one place where weight plumbing lives.

Understands three layouts of the same network:
- Hugging Face / DeepSeek: one tensor per expert (`mlp.experts.E.gate_proj.weight`) and the joint
  `self_attn.kv_b_proj.weight` of shape (H * (nope + v), kv_lora_rank);
- mlx-lm (`mlx_lm.convert`): experts stacked as `mlp.switch_mlp.*`; `kv_b_proj` (old layout, and
  every deepseek_v2 model) or the per-head `embed_q` (H, R, nope) / `unembed_out` (H, v, R) (new
  deepseek_v3 layout), quantized or not;
- ours: `switch_mlp.*` and `key_up` (H, nope, R) / `value_up` (H, v, R).
`kv_b_proj` rows are split per head, which keeps its quantization groups (along R) intact. A
quantized `embed_q` is grouped along `nope` and cannot be transposed in place: it is dequantized
exactly and `key_up` is held unquantized (on V2-Lite 40 MB more than at 4 bits).
"""

from __future__ import annotations

import re
from typing import Callable, Optional

import mlx.core as mx

from .models.config import ModelArgs

LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|scales|biases)$")
QUANT_PARTS = ("weight", "scales", "biases")


class CheckpointError(ValueError):
    """A checkpoint does not match what the config describes (names the file or tensor)."""


def is_mtp_tensor(name: str, args: ModelArgs) -> bool:
    """Tensors of the multi-token-prediction layer(s), stored after the main layers."""
    m = LAYER.match(name)
    return m is not None and int(m.group(1)) >= args.num_hidden_layers


def to_model_layout(
    weights: dict[str, mx.array], args: ModelArgs, quant_params: Callable[[str], Optional[dict]],
    keep_mtp: bool = False,
) -> dict[str, mx.array]:
    """Rename and reshape checkpoint tensors into our module layout (lazily: nothing is computed).

    `quant_params(module_path)` gives the quantization of a module in an mlx-lm folder (or None).
    With `keep_mtp`, the first MTP layer becomes `mtp.*`; its copies of the embedding and the head
    come out as `mtp.embed_tokens.*` / `mtp.lm_head.*` for the caller to compare with the main ones.
    """
    mtp_prefix = f"model.layers.{args.num_hidden_layers}."
    out: dict[str, mx.array] = {}
    experts: dict[str, dict[int, mx.array]] = {}
    for name, value in weights.items():
        if is_mtp_tensor(name, args) and not (keep_mtp and name.startswith(mtp_prefix)):
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if args.tie_word_embeddings and name.startswith("lm_head."):
            continue
        m = EXPERT.match(name)
        if m:
            prefix, index, proj, part = m.groups()
            experts.setdefault(f"{prefix}.switch_mlp.{proj}.{part}", {})[int(index)] = value
        else:
            out[name] = value
    for name, by_index in experts.items():
        out[name] = stack_experts(name, by_index, args.n_routed_experts or 0)

    for i in range(args.num_hidden_layers + (1 if keep_mtp else 0)):
        attn = f"model.layers.{i}.self_attn"
        if f"{attn}.kv_b_proj.weight" in out:
            _split_kv_b(out, attn, args)
        if f"{attn}.embed_q.weight" in out:
            _from_embed_q(out, attn, args, quant_params(f"{attn}.embed_q"))
        for part in QUANT_PARTS:
            if f"{attn}.unembed_out.{part}" in out:
                out[f"{attn}.value_up.{part}"] = out.pop(f"{attn}.unembed_out.{part}")
    if keep_mtp:
        for name in [n for n in out if n.startswith(mtp_prefix)]:
            out[mtp_module_name(name[len(mtp_prefix):])] = out.pop(name)
    return out


def stack_experts(name: str, by_index: dict[int, mx.array], count: int) -> mx.array:
    """One tensor per expert (`name` with `switch_mlp` where the checkpoint says `experts.E`) -> the
    stack (count, ...), after checking that experts 0..count-1 are all there, alike in shape."""
    missing = [e for e in range(count) if e not in by_index]
    if missing or len(by_index) != count:
        stem = name.replace("switch_mlp", "experts.{E}")
        raise CheckpointError(
            f"tensor {stem}: expected experts 0..{count - 1}, "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
            + (f", found {len(by_index)}" if not missing else "")
        )
    first = tuple(by_index[0].shape)
    odd = next((e for e in range(count) if tuple(by_index[e].shape) != first), None)
    if odd is not None:
        raise CheckpointError(
            f"tensor {name.replace('switch_mlp', f'experts.{odd}')} has shape {tuple(by_index[odd].shape)}, "
            f"expected {first} like expert 0"
        )
    return mx.stack([by_index[e] for e in range(count)])


MTP_NAMES = {"enorm.": "mtp.enorm.", "hnorm.": "mtp.hnorm.", "eh_proj.": "mtp.eh_proj.",
             "shared_head.norm.": "mtp.head_norm.", "embed_tokens.": "mtp.embed_tokens.",
             "shared_head.head.": "mtp.lm_head."}


def mtp_module_name(rest: str) -> str:
    """A name inside the checkpoint's MTP layer (after `model.layers.{N}.`) -> our module name."""
    for stored, ours in MTP_NAMES.items():
        if rest.startswith(stored):
            return ours + rest[len(stored):]
    return "mtp.block." + rest


def checkpoint_module_name(path: str, args: ModelArgs) -> str:
    """Our module path -> the one a checkpoint's config.json uses (they differ only inside the MTP)."""
    if not path.startswith("mtp.") or args.model_type == "deepseek_v4":
        return path
    prefix = f"model.layers.{args.num_hidden_layers}."
    for stored, ours in MTP_NAMES.items():
        if path.startswith(ours.rstrip(".")):
            return prefix + stored.rstrip(".") + path[len(ours.rstrip(".")):]
    return prefix + path[len("mtp.block."):]


def check_shapes(model, weights: dict, where) -> None:
    """Every parameter of `model` present in `weights` with its shape, and nothing else."""
    from mlx.utils import tree_flatten

    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    missing = sorted(expected.keys() - weights.keys())
    if missing:
        raise CheckpointError(f"{where}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(weights.keys() - expected.keys())
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} "
            "(does config.json match these weights?)"
        )
    for name, shape in expected.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise CheckpointError(f"{where}: tensor {name} has shape {got}, expected {shape} from config.json")


def _split_kv_b(out: dict, attn: str, args: ModelArgs) -> None:
    H, nope = args.num_attention_heads, args.qk_nope_head_dim
    for part in QUANT_PARTS:
        name = f"{attn}.kv_b_proj.{part}"
        if name not in out:
            continue
        w = out.pop(name)
        expected_rows = H * (nope + args.v_head_dim)
        if w.ndim != 2 or w.shape[0] != expected_rows:
            raise CheckpointError(
                f"tensor {name}: expected {expected_rows} rows (heads x (qk_nope_head_dim + "
                f"v_head_dim)), got shape {tuple(w.shape)}"
            )
        w = w.reshape(H, nope + args.v_head_dim, -1)
        out[f"{attn}.key_up.{part}"] = mx.contiguous(w[:, :nope])
        out[f"{attn}.value_up.{part}"] = mx.contiguous(w[:, nope:])


def _from_embed_q(out: dict, attn: str, args: ModelArgs, quant: Optional[dict]) -> None:
    w = out.pop(f"{attn}.embed_q.weight")
    scales = out.pop(f"{attn}.embed_q.scales", None)
    biases = out.pop(f"{attn}.embed_q.biases", None)
    if scales is not None:
        if quant is None:
            raise CheckpointError(f"tensor {attn}.embed_q.scales: quantized, but config.json has no quantization")
        w = mx.dequantize(w, scales, biases, group_size=quant["group_size"], bits=quant["bits"],
                          mode=quant.get("mode", "affine"))
    out[f"{attn}.key_up.weight"] = mx.contiguous(w.swapaxes(-1, -2))
