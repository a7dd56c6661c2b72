"""Peak memory of loading a block-FP8 checkpoint directly: `load_model(fp8)` (bf16 in memory) and
`load_model(fp8, quantize=4)` (quantize on load), each in its own process measured by its own rusage.

The checkpoint is DeepSeek-V3's layer shapes (hidden 7168, experts of 2048) cut to a few layers,
experts and an 8k vocabulary, random weights, written in DeepSeek's format (float8_e4m3fn with a
float32 weight_scale_inv per 128x128 block), one shard per layer.

    python -m bench.fp8_load [--layers 3] [--experts 8] [--config DeepSeek-V3] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import mlx.core as mx
import numpy as np

from bench.convert_memory import folder_gb, measure
from bench.synthetic import CACHE, build, results_dir


def to_fp8(w: mx.array, block: int = 128):
    """DeepSeek's block FP8 of a 2-D float weight: (fp8 bytes as uint8, float32 scale_inv per block)."""
    rows, cols = w.shape
    R, C = math.ceil(rows / block), math.ceil(cols / block)
    padded = mx.pad(w.astype(mx.float32), [(0, R * block - rows), (0, C * block - cols)])
    blocks = padded.reshape(R, block, C, block)
    scale = mx.maximum(mx.abs(blocks).max(axis=(1, 3)), 1e-12) / 448.0
    q = mx.to_fp8(blocks / scale[:, None, :, None]).reshape(R * block, C * block)[:rows, :cols]
    return mx.contiguous(q), scale


def fp8_checkpoint(src, layers: int, experts: int):
    import torch
    from safetensors.torch import save_file

    from convert.sources import open_source

    folder = CACHE / f"{src.name}-fp8"
    if (folder / "config.json").exists():
        return folder
    config = json.loads((src / "config.json").read_text())
    source = open_source(src, config)
    groups: dict[str, list[str]] = {}
    for name in source.names():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for key, names in groups.items():
        out = {}
        for name in names:
            w = source.read(name)
            if w.ndim == 2 and "proj" in name and "gate.weight" not in name:
                q, scale = to_fp8(w)
                mx.eval(q, scale)
                out[name] = torch.from_numpy(np.array(q)).view(torch.float8_e4m3fn)
                out[name + "_scale_inv"] = torch.from_numpy(np.array(scale))
            else:
                out[name] = torch.from_numpy(np.array(w.astype(mx.float32))).to(torch.bfloat16)
        file = f"model-{key}.safetensors"
        save_file(out, str(tmp / file))
        weight_map |= {n: file for n in out}
        del out
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 128]}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for side in ("tokenizer.json", "tokenizer_config.json"):
        (tmp / side).write_bytes((src / side).read_bytes())
    tmp.rename(folder)
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="DeepSeek-V3")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=3, help="1 dense + the rest MoE")
    p.add_argument("--experts", type=int, default=8)
    a = p.parse_args(argv)
    src = build(a.config, a.layers, a.experts, vocab=a.vocab, dense_layers=1)
    fp8 = fp8_checkpoint(src, a.layers, a.experts)
    rows = []
    for label, kwargs in (("load(fp8), bfloat16", ""), ("load(fp8, quantize=4)", ", quantize=4")):
        code = (f"import mlx.core as mx; from mlx.utils import tree_flatten; from mlx_deepseek import load_model; "
                f"m = load_model({str(fp8)!r}{kwargs}); "
                f"print(sum(v.nbytes for _, v in tree_flatten(m.parameters())) / 1e9)")
        result = measure([sys.executable, "-c", code])
        rows.append({"case": label, "fp8_checkpoint_gb": folder_gb(fp8), **result})
        print(f"{label}: checkpoint {folder_gb(fp8):.2f} GB, peak RSS {result['peak_rss_gb']:.2f} GB, "
              f"{result['seconds']:.0f} s")
    (results_dir() / "fp8_load.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
