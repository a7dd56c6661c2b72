"""What the output holds, decided before a byte is written: every output tensor's name, shape and
dtype, grouped in jobs that each produce a few consecutive tensors from a few source tensors.

The output is the layout mlx-lm reads (and so do we): routed experts stacked as
`mlp.switch_mlp.*`; `kv_b_proj` as is for deepseek_v2; for deepseek_v3 the per-head `embed_q`
(H, R, nope) and `unembed_out` (H, v, R) that mlx-lm's deepseek_v3 uses, so that neither loader
re-quantizes anything. Stacked experts are quantized one expert at a time and written as they
come: memory holds one source tensor plus the stack's scales, never the stack.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import mlx.core as mx

from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.layout import EXPERT, check_shapes, is_mtp_tensor, to_model_layout
from mlx_deepseek.models.deepseek import Model

from .recipes import Quant, Recipe
from .sources import Source

KEEP_FLOAT32 = ("e_score_correction_bias",)


@dataclass
class OutTensor:
    name: str
    shape: tuple
    dtype: mx.Dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.size
        for d in self.shape:
            n *= d
        return n


@dataclass
class Job:
    outputs: list[OutTensor]
    produce: Callable[[], Iterator[mx.array]]  # arrays whose bytes fill `outputs` in order
    parameters: int                            # weights represented (for bits per weight)
    quant: Optional[tuple[str, Quant]] = None  # (module path, quantization) when quantized


@dataclass
class Plan:
    jobs: list[Job] = field(default_factory=list)
    expert_bits: dict[str, list[int]] = field(default_factory=dict)  # layers whose experts differ in bits

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for j in self.jobs for t in j.outputs)

    @property
    def parameters(self) -> int:
        return sum(j.parameters for j in self.jobs)

    def quantization_config(self) -> Optional[dict]:
        """mlx-lm's `quantization` block: the most common setting plus per-module overrides."""
        quantized = [j.quant for j in self.jobs if j.quant]
        if not quantized:
            return None
        default = Counter(q for _, q in quantized).most_common(1)[0][0]
        config = default.as_config()
        for module, q in quantized:
            if q != default:
                config[module] = q.as_config()
        for module, bits in self.expert_bits.items():
            if len(set(bits)) > 1:
                config[module] = {"expert_bits": bits}
        return config


def quantized_shapes(shape: tuple, q: Quant, dtype: mx.Dtype) -> list[tuple[str, tuple, mx.Dtype]]:
    """(suffix, shape, dtype) of what mx.quantize returns for a weight of `shape`."""
    *lead, cols = shape
    scale_dtype = dtype if q.mode == "affine" else mx.uint8
    out = [("weight", (*lead, cols * q.bits // 32), mx.uint32), ("scales", (*lead, cols // q.group_size), scale_dtype)]
    if q.mode == "affine":
        out.append(("biases", (*lead, cols // q.group_size), dtype))
    return out


def make_plan(source: Source, args: ModelArgs, recipe: Recipe, dtype: mx.Dtype, drop_mtp: bool) -> Plan:
    names = [n for n in source.names() if not n.endswith("rotary_emb.inv_freq")]
    if args.tie_word_embeddings:
        names = [n for n in names if not n.startswith("lm_head.")]
    if drop_mtp:
        names = [n for n in names if not is_mtp_tensor(n, args)]
    _check_against_config(source, names, args)

    plan = Plan(expert_bits=recipe.expert_bits)
    experts: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        m = EXPERT.match(name)
        if m:
            prefix, index, proj, _ = m.groups()
            experts.setdefault(f"{prefix}.switch_mlp.{proj}", []).append((int(index), name))
    for name in sorted(names, key=_natural):
        m = EXPERT.match(name)
        if m:
            module = f"{m.group(1)}.switch_mlp.{m.group(3)}"
            if module in experts:  # the first expert of a stack brings the whole stack
                parts = [n for _, n in sorted(experts.pop(module))]
                plan.jobs.extend(_expert_jobs(source, f"{m.group(1)}.switch_mlp", m.group(3), parts, recipe, dtype))
        elif name.endswith("self_attn.kv_b_proj.weight") and args.family == "deepseek_v3":
            plan.jobs.extend(_split_kv_b_jobs(source, name, args, recipe, dtype))
        else:
            plan.jobs.append(_tensor_job(source, name, recipe, dtype))
    return plan


def _expert_jobs(source: Source, switch_mlp: str, proj: str, parts: list[str], recipe: Recipe,
                 dtype: mx.Dtype) -> list[Job]:
    """One stack of all experts, or with per-expert bits one stack per width (widest first). A layer
    whose experts all got one width stays one plain stack, in the layout mlx-lm reads."""
    bits = recipe.expert_bits.get(switch_mlp)
    if bits is None or len(set(bits)) == 1:
        module = f"{switch_mlp}.{proj}"
        q = recipe(module if bits is None else f"{switch_mlp}.bits{bits[0]}.{proj}")
        return [_matrix_job(source, module, parts, q, dtype, stacked=True)]
    jobs = []
    for b in sorted(set(bits), reverse=True):
        module = f"{switch_mlp}.bits{b}.{proj}"
        chosen = [p for p, e_bits in zip(parts, bits) if e_bits == b]
        jobs.append(_matrix_job(source, module, chosen, recipe(module), dtype, stacked=True))
    return jobs


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _check_against_config(source: Source, names: list[str], args: ModelArgs) -> None:
    """Shapes of the main layers against what config.json implies (nothing is read or allocated)."""
    stand_ins = {n: mx.zeros(source.tensors[n].shape) for n in names if not is_mtp_tensor(n, args)}
    check_shapes(Model(args), to_model_layout(stand_ins, args, lambda p: None), source.folder)


def _quantizable(q: Optional[Quant], shape: tuple) -> bool:
    return q is not None and len(shape) >= 2 and shape[-1] % q.group_size == 0


def _tensor_job(source: Source, name: str, recipe: Recipe, dtype: mx.Dtype) -> Job:
    shape = source.tensors[name].shape
    module, _, part = name.rpartition(".")
    q = recipe(module) if part == "weight" else None
    if _quantizable(q, shape):
        return _matrix_job(source, module, [name], q, dtype)
    out_dtype = mx.float32 if name.endswith(KEEP_FLOAT32) else dtype
    count = 1
    for d in shape:
        count *= d
    return Job([OutTensor(name, shape, out_dtype)], lambda: iter([source.read(name).astype(out_dtype)]), count)


def _matrix_job(source: Source, module: str, parts: list[str], q: Optional[Quant], dtype: mx.Dtype,
                transform: Callable[[mx.array], mx.array] = lambda w: w, shape: Optional[tuple] = None,
                stacked: bool = False) -> Job:
    """One module's weight, from one tensor or stacked from several (experts), quantized or not.
    `parts` are source tensor names, or functions that read one part (a slice of a tensor)."""
    shape = shape or source.tensors[parts[0]].shape
    lead = (len(parts),) if stacked else ()
    count = len(parts)
    for d in shape:
        count *= d
    reads = [p if callable(p) else (lambda p=p: source.read(p)) for p in parts]  # names, or readers
    if not _quantizable(q, shape):
        def produce_float():
            for read in reads:
                yield transform(read()).astype(dtype)
        return Job([OutTensor(f"{module}.weight", lead + shape, dtype)], produce_float, count)

    outputs = [OutTensor(f"{module}.{suffix}", lead + s, d) for suffix, s, d in quantized_shapes(shape, q, dtype)]

    def produce():
        rest = [[] for _ in outputs[1:]]
        for read in reads:
            w, *others = mx.quantize(transform(read()).astype(dtype), q.group_size, q.bits, mode=q.mode)
            mx.eval(w, *others)
            yield w
            for keep, o in zip(rest, others):
                keep.append(o)
        for keep in rest:
            yield from keep

    return Job(outputs, produce, count, (module, q))


def _split_kv_b_jobs(source: Source, name: str, args: ModelArgs, recipe: Recipe, dtype: mx.Dtype) -> list[Job]:
    H, nope, v, R = args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim, args.kv_lora_rank
    attn = name[: -len(".kv_b_proj.weight")]

    def per_head(w):
        return w.reshape(H, nope + v, R)

    embed_q = lambda w: mx.contiguous(per_head(w)[:, :nope].swapaxes(1, 2))  # noqa: E731  (H, R, nope)
    unembed_out = lambda w: mx.contiguous(per_head(w)[:, nope:])  # noqa: E731  (H, v, R)
    return [
        _matrix_job(source, f"{attn}.embed_q", [name], recipe(f"{attn}.embed_q"), dtype, embed_q, (H, R, nope)),
        _matrix_job(source, f"{attn}.unembed_out", [name], recipe(f"{attn}.unembed_out"), dtype, unembed_out, (H, v, R)),
    ]
