"""The output plan of a DeepSeek-V4 checkpoint (published layout, FP8/FP4 or float, or transformers 5).

Output names are our module names (mlx_deepseek/layout_v4.py): `embed`, `head`, `layers.N.attn.*`
(wo_a per group, (o_groups, o_lora_rank, in)), routed experts stacked as `layers.N.ffn.switch_mlp.*`,
`hc_attn.fn`, ..., and the MTP block as `mtp.*` / `mtp.block.*`; a converted folder is read back by
the same mapping, unchanged. Routed experts that are FP4 and get mxfp4 (the default) are copied byte
for byte (convert/fp4.py); everything else is read in float32 (FP8 dequantized exactly) and
quantized per the recipe, one tensor (one expert) at a time, as for V2/V3.
"""

from __future__ import annotations

import re

import mlx.core as mx

from mlx_deepseek.layout import CheckpointError, check_shapes
from mlx_deepseek.layout_v4 import hf_native_views, is_hf_layout, is_mtp_copy, v4_module_name
from mlx_deepseek.models.deepseek_v4 import Model, V4Args

from . import fp4
from .plan import Job, OutTensor, Plan, _matrix_job, _natural, _quantizable, quantized_shapes
from .recipes import Quant, Recipe
from .sources import Source

MXFP4 = Quant(4, 32, "mxfp4")
# What DeepSeek's published checkpoint stores in FP8 (its model.py: Linear layers of the default
# dtype, and wo_a, "FP8 in checkpoint"); routed experts are FP4; the rest bf16 or float32.
PUBLISHED_FP8 = re.compile(r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|shared_experts\.w[123]"
                           r"|e_proj|h_proj)\.weight$")
# Kept in float32 whatever --dtype says (they are float32 in the checkpoint and used so).
KEEP_FLOAT32 = (".fn", ".base", ".scale", "attn_sink", ".ape", "ffn.gate.bias")


def make_plan_v4(source: Source, args: V4Args, recipe: Recipe, dtype: mx.Dtype, drop_mtp: bool) -> Plan:
    names = source.names()
    shapes = {n: source.shape(n) for n in names}
    views = hf_native_views(shapes) if is_hf_layout(names) else {n: (n, None) for n in names}
    views = {k: v for k, v in views.items() if not is_mtp_copy(k)}
    if drop_mtp:
        views = {k: v for k, v in views.items() if not k.startswith("mtp.")}
    views = {k: v for k, v in views.items() if not re.match(r"^mtp\.[1-9]\d*\.", k)}  # only the first MTP block
    mtp = any(k.startswith("mtp.") for k in views)

    # our tensor name -> [(expert index or None, native name)]
    outputs: dict[str, list] = {}
    for native in views:
        name, expert = v4_module_name(native)
        outputs.setdefault(name, []).append((expert, native))
    expected = _expected_shapes(args, mtp)
    _check(source, views, outputs, expected, args)

    plan = Plan()
    for name in sorted(outputs, key=_natural):
        parts = outputs[name]
        if parts[0][0] is not None:
            plan.jobs.append(_expert_job(source, views, name, [n for _, n in sorted(parts)], recipe, dtype))
        else:
            plan.jobs.append(_tensor_job(source, views, name, parts[0][1], expected[name], recipe, dtype))
    return plan


def _expected_shapes(args: V4Args, mtp: bool) -> dict[str, tuple]:
    from mlx.utils import tree_flatten

    return {k: tuple(v.shape) for k, v in tree_flatten(Model(args, mtp=mtp).parameters())}


def _where(source: Source, views: dict, native: str) -> str:
    name = views[native][0]
    return f"{source.tensors[name].file}: tensor {name}"


def _shape(source: Source, views: dict, native: str) -> tuple:
    name, part = views[native]
    shape = source.shape(name)
    return shape if part is None else (part[2] - part[1], *shape[2:])


def _check(source: Source, views: dict, outputs: dict, expected: dict, args: V4Args) -> None:
    """Everything the config implies, before anything is read: the experts of every stack, FP4
    packing, and every tensor's shape (missing compressor, indexer or tid2eid tensors included)."""
    stand_ins = {}
    for name, parts in outputs.items():
        if parts[0][0] is None:
            shape = _shape(source, views, parts[0][1])
            if name.endswith(".attn.wo_a.weight") and len(shape) == 2 and shape[0] % args.o_groups == 0:
                shape = (args.o_groups, shape[0] // args.o_groups, shape[1])
            stand_ins[name] = shape
            continue
        have = {e: n for e, n in parts}
        missing = [e for e in range(args.n_routed_experts) if e not in have]
        if missing:
            stem = re.sub(r"\.experts\.\d+\.", ".experts.{E}.", parts[0][1])
            raise CheckpointError(f"{source.folder}: tensor {stem}: expected experts 0..{args.n_routed_experts - 1}, "
                                  f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        want = expected.get(name, (None,))[1:]
        for e in sorted(have):
            got = _shape(source, views, have[e])
            if name in expected and got != want:
                src = views[have[e]][0]
                if source.is_fp4(src):
                    raise CheckpointError(
                        f"{_where(source, views, have[e])} is FP4 packed as {tuple(source.tensors[src].shape)}; "
                        f"expected [out, in/2] = {(want[0], want[1] // 2)} for its {want} values "
                        "(two e2m1 values per byte)")
                raise CheckpointError(f"{_where(source, views, have[e])} has shape {got}, expected {want} "
                                      "from config.json")
        stand_ins[name] = (len(have), *want) if name in expected else (len(have),)
    try:
        check_shapes(_Shapes(expected), {k: _Shape(v) for k, v in stand_ins.items()}, source.folder)
    except CheckpointError as e:
        if "missing" not in str(e):
            raise
        raise CheckpointError(f"{e} (DeepSeek-V4: every CSA layer (compress_ratio 4) needs its compressor and "
                              "indexer, every HCA layer its compressor, every hash layer its tid2eid)") from None


class _Shape:
    def __init__(self, shape):
        self.shape = shape


class _Shapes:
    """What check_shapes reads of a model: its parameters' names and shapes."""

    def __init__(self, expected: dict):
        from mlx.utils import tree_unflatten

        self._tree = tree_unflatten([(k, _Shape(v)) for k, v in expected.items()])

    def parameters(self):
        return self._tree


def _reader(source: Source, views: dict, native: str):
    name, part = views[native]
    if part is None:
        return lambda: source.read(name)
    e, start, stop = part
    return lambda: source.read(name, rows=(e, e + 1))[0, start:stop]


def _tensor_job(source: Source, views: dict, name: str, native: str, shape: tuple, recipe: Recipe,
                dtype: mx.Dtype) -> Job:
    module, _, leaf = name.rpartition(".")
    read = _reader(source, views, native)
    if name.endswith("ffn.gate.tid2eid"):
        return Job([OutTensor(name, shape, mx.int32)], lambda: iter([read().astype(mx.int32)]), 0)
    if name.endswith(".attn.wo_a.weight"):
        transform = lambda w: w.reshape(shape)  # noqa: E731  (groups * rank, in) -> (groups, rank, in)
    else:
        transform = lambda w: w  # noqa: E731
    q = recipe(module) if leaf == "weight" else None
    if _quantizable(q, shape):
        return _matrix_job(source, module, [lambda: transform(read())], q, dtype, shape=shape)
    out_dtype = mx.float32 if name.endswith(KEEP_FLOAT32) else dtype
    count = 1
    for d in shape:
        count *= d
    return Job([OutTensor(name, shape, out_dtype)], lambda: iter([transform(read()).astype(out_dtype)]), count)


def _expert_job(source: Source, views: dict, name: str, natives: list[str], recipe: Recipe, dtype: mx.Dtype) -> Job:
    """One stack of a layer's routed experts: FP4 carried into mxfp4 as it is, or read and quantized."""
    module = name[: -len(".weight")]
    q = recipe(module)
    sources = [views[n] for n in natives]
    if q == MXFP4 and all(part is None and source.is_fp4(src) for src, part in sources):
        return _carried_fp4_job(source, module, [src for src, _ in sources], dtype)
    shape = _shape(source, views, natives[0])
    return _matrix_job(source, module, [_reader(source, views, n) for n in natives], q, dtype, shape=shape,
                       stacked=True)


def _carried_fp4_job(source: Source, module: str, parts: list[str], dtype: mx.Dtype) -> Job:
    """Each expert's packed bytes become its mxfp4 weight rows, its e8m0 scales the scales: no arithmetic."""
    shape = source.shape(parts[0])
    outputs = [OutTensor(f"{module}.{suffix}", (len(parts), *s), d)
               for suffix, s, d in quantized_shapes(shape, MXFP4, dtype)]

    def produce():
        scales = []
        for p in parts:
            weight, scale = fp4.as_mxfp4(*source.read_fp4(p))
            yield weight
            scales.append(scale)
        yield from scales

    return Job(outputs, produce, len(parts) * shape[0] * shape[1], (module, MXFP4))


def published_tensors(args: V4Args, block: int = 128) -> dict[str, tuple[tuple, str]]:
    """Every tensor DeepSeek's published checkpoint holds for `args`: name -> (shape, safetensors
    dtype), derived from our model's parameters. FP8 projections with e8m0 block scales, FP4
    experts with e8m0 scales per 32, hyper-connections, sinks, ape and the gate bias float32,
    tid2eid int64, the rest bf16. For sizes (nothing is read) and synthetic checkpoints."""
    from mlx.utils import tree_flatten

    names = {}
    for name, p in tree_flatten(Model(args, mtp=True).parameters()):
        shape = tuple(p.shape)
        native = re.sub(r"^mtp\.(block\.)?", "mtp.0.", name)
        native = re.sub(r"(^|\.)hc_(attn|ffn|head)\.(fn|base|scale)$", r"\1hc_\2_\3", native)
        native = re.sub(r"\.shared_experts\.(gate|up|down)_proj\.",
                        lambda m: f".shared_experts.w{ {'gate': 1, 'down': 2, 'up': 3}[m.group(1)]}.", native)
        if native.endswith(".attn.wo_a.weight"):
            shape = (shape[0] * shape[1], shape[2])
        m = re.match(r"^(.*\.ffn)\.switch_mlp\.(gate|up|down)_proj\.weight$", native)
        if m:
            w = {"gate": 1, "down": 2, "up": 3}[m.group(2)]
            for e in range(shape[0]):
                names[f"{m.group(1)}.experts.{e}.w{w}.weight"] = ((shape[1], shape[2] // 2), "I8")
                names[f"{m.group(1)}.experts.{e}.w{w}.scale"] = ((shape[1], shape[2] // fp4.GROUP), "F8_E8M0")
        elif PUBLISHED_FP8.search(native):
            names[native] = (shape, "F8_E4M3")
            names[native[: -len("weight")] + "scale"] = ((-(-shape[0] // block), -(-shape[1] // block)), "F8_E8M0")
        elif native.endswith("tid2eid"):
            names[native] = (shape, "I64")
        elif native.endswith(("_fn", "_base", "_scale", "attn_sink", ".ape", "gate.bias")):
            names[native] = (shape, "F32")
        else:
            names[native] = (shape, "BF16")
    return names
