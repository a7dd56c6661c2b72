"""A new chunk on a long cache, attention only: our MLA (absorbed, decompressed in blocks, and what
`MLA.absorbs` picks) against mlx-lm's attention of the same family, on the same shapes.

One attention layer per shape (DeepSeek-V2-Lite: mlx-lm caches per-head keys and values;
DeepSeek-V3: mlx-lm caches latents and decompresses them for any chunk longer than one token),
4-bit projections, float32 activations, caches filled with `context` random entries, then one
chunk of `chunk` tokens timed (after a warm-up on a short cache) with its peak memory. The rest of a
layer (MoE / MLP) does the same work in both runners, so this is where they differ. `--heads`
scales both runners' heads down alike (the per-head work is unchanged) so the table finishes on a
slow CPU.

    python -m bench.chunk_attention [--profile full|cpu|quick] [--heads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from bench.common import machine
from bench.synthetic import results_dir
from mlx_deepseek.models.cache import LatentCache
from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.models.mla import MLA
from bench.synthetic import CONFIGS

PROFILES = {
    "cpu": {"shapes": ["DeepSeek-V2-Lite", "DeepSeek-V3"], "contexts": [4096, 16384], "chunks": [32, 128, 256, 512]},
    "quick": {"shapes": ["DeepSeek-V2-Lite", "DeepSeek-V3"], "contexts": [1024], "chunks": [32, 256]},
}


def shape(name: str, heads: int) -> dict:
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    return {**config, "num_attention_heads": heads or config["num_attention_heads"]}


def ours(config: dict, mode: str):
    """(layer, fill(context) -> cache, call(x, cache)); mode: auto (MLA.absorbs), absorbed, decompressed."""
    mx.random.seed(0)
    layer = MLA(ModelArgs.from_dict(config))
    nn.quantize(layer, group_size=64, bits=4)
    mx.eval(layer.parameters())

    def fill(context):
        cache = LatentCache()
        cache.update_and_fetch(mx.random.normal((1, 1, context, layer.rank)),
                               mx.random.normal((1, 1, context, layer.rope_dim)))
        mx.eval(cache.buffers)
        return cache

    def call(x, cache):
        if mode != "auto":
            layer.absorbs = lambda L, T: mode == "absorbed"
        return layer(x, cache=cache)

    return fill, call


def theirs(config: dict):
    import importlib

    from mlx_lm.models.base import create_causal_mask
    from mlx_lm.models.cache import KVCache

    family = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    args = family.ModelArgs.from_dict(config)
    attention = (family.DeepseekV3Attention if config["model_type"] == "deepseek_v3" else family.DeepseekV2Attention)
    mx.random.seed(0)
    layer = attention(args)
    nn.quantize(layer, group_size=64, bits=4)
    mx.eval(layer.parameters())
    H, rope = args.num_attention_heads, args.qk_rope_head_dim

    def fill(context):
        cache = KVCache()
        if config["model_type"] == "deepseek_v3":  # latents and the shared RoPE key
            kv = (mx.random.normal((1, 1, context, args.kv_lora_rank)), mx.random.normal((1, 1, context, rope)))
        else:  # per-head keys and values
            kv = (mx.random.normal((1, H, context, args.qk_nope_head_dim + rope)),
                  mx.random.normal((1, H, context, args.v_head_dim)))
        cache.update_and_fetch(*kv)
        mx.eval(cache.keys, cache.values)
        return cache

    def call(x, cache):
        L = x.shape[1]
        return layer(x, mask=create_causal_mask(L, cache.offset) if L > 1 else None, cache=cache)

    return fill, call


def measure(fill, call, config: dict, context: int, chunk: int) -> dict:
    x = mx.random.normal((1, chunk, config["hidden_size"])) * 0.1
    mx.eval(call(x[:, :8], fill(64)))  # warm-up
    cache = fill(context)
    mx.synchronize()
    mx.reset_peak_memory()
    start = time.perf_counter()
    mx.eval(call(x, cache))
    return {"seconds": time.perf_counter() - start, "peak_gb": mx.get_peak_memory() / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=list(PROFILES), default="cpu")
    p.add_argument("--heads", type=int, default=2, help="attention heads for both runners (0: the real count)")
    a = p.parse_args(argv)
    sizes = PROFILES[a.profile]
    rows = []
    print(f"\nOne attention layer, a chunk on a filled cache, {a.heads or 'all'} heads ({machine()})\n")
    print("| shape | chunk on cache | ours picks | ours s | absorbed s | decompressed s | mlx-lm s | ratio "
          "| ours peak GB | mlx-lm peak GB |")
    print("|---|---|:-:|---:|---:|---:|---:|---:|---:|---:|")
    for name in sizes["shapes"]:
        config = shape(name, a.heads)
        runners = {"absorbed": ours(config, "absorbed"), "decompressed": ours(config, "decompressed"),
                   "mlx-lm": theirs(config)}
        picker = MLA(ModelArgs.from_dict(config))
        for context in sizes["contexts"]:
            for chunk in sizes["chunks"]:
                r = {k: measure(*runner, config, context, chunk) for k, runner in runners.items()}
                pick = "absorbed" if picker.absorbs(chunk, context + chunk) else "decompressed"
                o, t = r[pick], r["mlx-lm"]
                rows.append({"shape": name, "context": context, "chunk": chunk, "heads": config["num_attention_heads"],
                             "picks": pick, **r})
                print(f"| {name} | {chunk} on {context} | {pick[:3]} | {o['seconds']:.2f} | {r['absorbed']['seconds']:.2f} "
                      f"| {r['decompressed']['seconds']:.2f} | {t['seconds']:.2f} | {t['seconds'] / o['seconds']:.2f} "
                      f"| {o['peak_gb']:.3f} | {t['peak_gb']:.3f} |", flush=True)
    (results_dir() / f"chunk-attention-{a.profile}.json").write_text(
        json.dumps({"machine": machine(), "profile": a.profile, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
