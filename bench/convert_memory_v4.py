"""Converting DeepSeek-V4 as published: peak RSS and wall time on Flash-shaped checkpoints.

Synthetic checkpoints in DeepSeek's published layout with V4-Flash's layer shapes (FP8
projections with e8m0 block scales, FP4 experts, bf16 and float32 tensors as published:
convert.plan_v4.published_tensors), fewer layers and experts, random bytes, are converted with
the default recipe (experts carried as mxfp4, the rest 8-bit) and with -q --q-bits 2, each run in
its own process. The peak should stay flat as the checkpoint grows. There is no mlx-lm anchor:
mlx-lm has no deepseek_v4 converter.

    python -m bench.convert_memory_v4 [--layers 4 8] [--experts 16] [--vocab 16384]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from bench.convert_memory import folder_gb, measure
from bench.synthetic import CONFIGS, ROOT, results_dir

BYTES = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I64": 8}


def flash_config(layers: int, experts: int, vocab: int) -> dict:
    flash = json.loads((CONFIGS / "DeepSeek-V4-Flash.json").read_text())
    ratios = flash["compress_ratios"][:layers] + [0]
    return {**flash, "num_hidden_layers": layers, "compress_ratios": ratios, "n_routed_experts": experts,
            "num_hash_layers": min(flash["num_hash_layers"], layers), "vocab_size": vocab}


def random_bytes(rng, shape: tuple, dtype: str, experts: int) -> np.ndarray:
    if dtype == "F8_E4M3":
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        a[(a & 0x7F) == 0x7F] = 0x70  # no NaN codes
    elif dtype == "I8":
        a = rng.integers(0, 256, shape, dtype=np.uint8)
    elif dtype == "F8_E8M0":
        a = np.full(shape, 120, np.uint8)
    elif dtype == "I64":
        a = rng.integers(0, experts, shape).astype(np.int64)
    elif dtype == "F32":
        a = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    else:  # bf16: the top half of float32
        a = ((0.02 * rng.standard_normal(shape)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return a


def build(config: dict, folder: Path, shard_bytes: int = 1_000_000_000) -> None:
    """Write the checkpoint shard by shard, tensor by tensor (memory: one tensor)."""
    from convert.plan_v4 import published_tensors
    from mlx_deepseek.models import args_from_config

    args = args_from_config(config)
    tensors = published_tensors(args)
    folder.mkdir(parents=True)
    shards, current, size = [], [], 0
    for name, (shape, dtype) in tensors.items():
        n = BYTES[dtype] * math.prod(shape)
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += n
    shards.append(current)
    rng, weight_map = np.random.default_rng(0), {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            shape, dtype = tensors[name]
            n = BYTES[dtype] * math.prod(shape)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name in names:
                f.write(random_bytes(rng, *tensors[name], args.n_routed_experts).tobytes())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--vocab", type=int, default=16384)
    a = p.parse_args(argv)

    rows = []
    (ROOT / ".cache").mkdir(exist_ok=True)
    for layers in a.layers:
        with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
            src = Path(tmp) / "src"
            build(flash_config(layers, a.experts, a.vocab), src)
            size = folder_gb(src)
            for recipe, flags in (("default (experts as shipped, rest 8-bit)", []), ("-q --q-bits 2", ["-q", "--q-bits", "2"])):
                out = Path(tmp) / "out"
                m = measure([sys.executable, "-m", "convert", "--hf-path", str(src), "--mlx-path", str(out), *flags])
                rows.append({"layers": layers, "recipe": recipe, "source_gb": size, "output_gb": folder_gb(out), **m})
                shutil.rmtree(out)

    print(f"\nConverting V4-Flash-shaped checkpoints ({a.experts} experts, vocab {a.vocab}; "
          f"{platform.machine()}, MLX {mx.__version__})\n")
    print("| layers (+MTP) | source GB | recipe | output GB | peak RSS GB | wall s |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['source_gb']:.2f} | {r['recipe']} | {r['output_gb']:.2f} | "
              f"{r['peak_rss_gb']:.2f} | {r['seconds']:.1f} |")
    (results_dir() / "convert_memory_v4.json").write_text(json.dumps(
        {"machine": platform.machine(), "mlx": mx.__version__, "experts": a.experts, "vocab": a.vocab,
         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
