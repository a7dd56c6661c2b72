"""The command line: python -m convert --hf-path SRC --mlx-path DST [-q] [...] (also `mlx-deepseek-convert`)."""

from __future__ import annotations

import argparse
import errno
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_deepseek.models import args_from_config, is_v4
from mlx_deepseek.models.config import ConfigError, ModelArgs
from mlx_deepseek.layout import CheckpointError
from mlx_deepseek.loading import MODEL_FILES, read_config, resolve_model_path

from .expert_bits import expert_aware_bits, read_usage
from .plan import make_plan
from .plan_v4 import make_plan_v4
from .recipes import V4_DEFAULT, Quant, Recipe, RecipeError
from .sources import open_source
from .writer import atomic_folder, shard_jobs, write_shard

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
# Copied beside the weights: what tokenizers and chat templates need, and the sampling defaults.
SIDE_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja", "chat_template.json", "added_tokens.json",
              "vocab.json", "merges.txt"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    p.add_argument("--hf-path", required=True, help="source: a local folder or a Hugging Face repo id")
    p.add_argument("--mlx-path", required=True, help="the output folder (must not exist, unless --force)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize (default 4 bits, group 64, affine)")
    p.add_argument("--q-bits", type=int, default=None, help="bits per weight: 2, 3, 4, 5, 6 or 8 (default 4)")
    p.add_argument("--q-group-size", type=int, default=None, help="32, 64 or 128 (mx modes fix their own)")
    p.add_argument("--q-mode", default=None, help="affine (default), mxfp4, nvfp4 or mxfp8")
    p.add_argument("--recipe", help="mixed precision by module kind: a name (mixed-3-6, ...) or rules "
                                    "like 'routed_experts=3,attention=6,embed=8'")
    p.add_argument("--expert-usage", metavar="FILE",
                   help="expert-aware bits: counts from python -m mlx_deepseek.calibrate; busy experts get more bits")
    p.add_argument("--expert-bits", default="2,3,4", help="with --expert-usage: the widths experts may get")
    p.add_argument("--target-bits", type=float, help="with --expert-usage: average bits per routed-expert weight, "
                   "scales included (default: what the routed experts would get without --expert-usage)")
    p.add_argument("--dtype", choices=list(DTYPES), help="float dtype of what is not quantized (default: the source's)")
    p.add_argument("--drop-mtp", action="store_true", help="leave out the multi-token-prediction layer")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return convert(args)
    except (CheckpointError, ConfigError, RecipeError, FileExistsError, OSError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            e = f"the disk filled up while writing ({e}); the partial output was removed, nothing else was touched"
        print(f"error: {e}", file=sys.stderr)
        return 1


def convert(args) -> int:
    start = time.perf_counter()
    dst = Path(args.mlx_path).expanduser()
    if dst.exists() and not args.force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    src = resolve_model_path(args.hf_path, MODEL_FILES + ["*.bin", "*.py"])
    check_destination(src, dst)
    config = read_config(src)
    try:
        model_args = args_from_config(config)
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None
    v4 = is_v4(model_args)
    chosen = args.quantize or args.recipe or any(v is not None for v in (args.q_bits, args.q_group_size, args.q_mode))
    q_mode, q_bits = args.q_mode or "affine", args.q_bits or 4
    mode_group = {"mxfp4": 32, "mxfp8": 32, "nvfp4": 16}.get(q_mode, 64)
    # DeepSeek-V4 with no quantization flags: experts as shipped (mxfp4), the rest at 8 bits; any
    # of -q, --q-bits, --q-group-size, --q-mode asks for that quantization (as -q does for V2/V3).
    quantize = args.quantize or (v4 and chosen and not args.recipe)
    default = Quant(q_bits, args.q_group_size or mode_group, q_mode) if quantize else None
    if v4 and not chosen:
        recipe = Recipe(Quant(8, 64), V4_DEFAULT)
    else:
        recipe = Recipe(default, args.recipe)
    dtype = DTYPES[args.dtype or _source_dtype(config)]
    if args.expert_usage and v4:
        raise RecipeError("--expert-usage: expert-aware bits are not supported for deepseek_v4 yet")
    usage = _expert_aware(args, model_args, recipe, dtype) if args.expert_usage else None

    source = open_source(src, config)
    if v4:
        plan = make_plan_v4(source, model_args, recipe, dtype, args.drop_mtp)
    else:
        plan = make_plan(source, model_args, recipe, dtype, args.drop_mtp)
    free = shutil.disk_usage(dst.parent if dst.parent.exists() else Path.cwd()).free
    if plan.nbytes * 1.01 + 64e6 > free:
        raise OSError(f"{dst.parent}: the output needs {plan.nbytes / 1e9:.2f} GB, only {free / 1e9:.2f} GB free")

    shards = shard_jobs(plan, int(args.max_shard_size_gb * 1e9))
    weight_map = {}
    with atomic_folder(dst, args.force) as tmp, _progress(plan) as progress:
        for i, jobs in enumerate(shards, start=1):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            for tensor in write_shard(tmp / name, jobs, progress):
                weight_map[tensor] = name
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": plan.nbytes}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(_output_config(config, plan, dtype, args.drop_mtp), indent=2))
        if usage:
            (tmp / "expert_usage.json").write_text(json.dumps(usage, indent=1))
        for side in SIDE_FILES:
            if (src / side).is_file():
                shutil.copy2(src / side, tmp / side)

    seconds = time.perf_counter() - start
    print(f"Wrote {dst}: {plan.nbytes / 1e9:.3f} GB in {len(shards)} shard(s), "
          f"{plan.nbytes * 8 / plan.parameters:.3f} bits per weight, {seconds:.1f} s")
    return 0


def check_destination(src: Path, dst: Path) -> None:
    """Refused before any work: writing into the source, over it, around it, or where we cannot write."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise FileExistsError(f"{dst} is the source folder; choose another --mlx-path")
    if s in d.parents:
        raise FileExistsError(f"{dst} is inside the source folder {src}; choose a folder outside it")
    if d in s.parents:
        raise FileExistsError(f"{dst} contains the source folder {src}; replacing it would delete the source")
    parent = d.parent
    while not parent.exists():
        parent = parent.parent
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{dst.name}.probe-"):
            pass
    except OSError as e:
        raise OSError(f"{parent}: cannot write the output there ({e.strerror or e})") from None


def _expert_aware(args, model_args: ModelArgs, recipe: Recipe, dtype) -> dict:
    """Set the recipe's per-expert bits; returns the usage file plus the choice, to keep beside the weights."""
    try:
        widths = [int(w) for w in args.expert_bits.split(",") if w.strip()]
    except ValueError:
        raise RecipeError(f"--expert-bits {args.expert_bits!r}: expected comma-separated integers like 2,3,4") from None
    usage = read_usage(Path(args.expert_usage), model_args)
    base = recipe(next(iter(usage["counts"])) + ".gate_proj")
    recipe.expert_bits, target, achieved = expert_aware_bits(usage, base, widths, args.target_bits, dtype.size * 8)
    flat = [b for bits in recipe.expert_bits.values() for b in bits]
    spread = ", ".join(f"{flat.count(b)} at {b} bits" for b in sorted(set(flat), reverse=True))
    print(f"Expert-aware bits: {spread}; {achieved:.3f} bits per routed-expert weight (target {target:.3f})")
    return {**usage, "bits": recipe.expert_bits, "expert_widths": widths, "target_bits": target,
            "routed_expert_bits_per_weight": achieved}


def _source_dtype(config: dict) -> str:
    name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return name if name in DTYPES else "bfloat16"


def _output_config(config: dict, plan, dtype, drop_mtp: bool) -> dict:
    out = {k: v for k, v in config.items() if k not in ("quantization_config", "quantization")}
    out["torch_dtype"] = {mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32"}[dtype]
    if drop_mtp:
        out["num_nextn_predict_layers"] = 0
    q = plan.quantization_config()
    if q:
        out["quantization"] = q
        out["quantization_config"] = q  # as mlx-lm writes it
    return out


class _progress:
    """A tqdm bar over output bytes (tensors, bytes, ETA)."""

    def __init__(self, plan):
        from tqdm import tqdm

        self.bar = tqdm(total=plan.nbytes, unit="B", unit_scale=True, desc=f"{len(plan.jobs)} tensor groups",
                        disable=None)

    def __enter__(self):
        return self.bar.update

    def __exit__(self, *exc):
        self.bar.close()
