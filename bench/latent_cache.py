"""What a quantized latent cache costs in quality, by context length, and whether the RoPE key
should be quantized too:

    python -m bench.latent_cache [--windows 4] [--window 1024]

On shared/models/tinyseek-py (trained; float32 here, the CPU's fast dtype) and its validation
text, each cache is compared with the plain cache on the same model: mean KL by position range,
top-1 agreement, greedy flips. Bytes per token and layer are for DeepSeek-V3's shapes in bf16
(kv_lora_rank 512, RoPE key 64); the plain cache holds the model dtype. The "+ RoPE key" rows
quantize the RoPE key in groups of its full width (simulated: quantized and dequantized on the
way in, which yields exactly the values a quantized store would return); the runtime keeps it in
the model dtype, and this shows why.
"""

from __future__ import annotations

import argparse
import json

import mlx.core as mx
import numpy as np

from bench.common import machine
from bench.synthetic import CONFIGS, TINYSEEK, results_dir
from mlx_deepseek import load_model
from mlx_deepseek.models.cache import QuantizedLatentCache, latent_bytes_per_token
from mlx_deepseek.models.config import ModelArgs
from mlx_deepseek.eval import quality, windows

GROUP = 32  # tinyseek's kv_lora_rank is 64


class RopeKeyQuantized(QuantizedLatentCache):
    """A quantized latent cache whose RoPE key also passes through `bits`-bit quantization."""

    def update_and_fetch(self, latent: mx.array, rope_key: mx.array):
        width = rope_key.shape[-1]
        q = mx.dequantize(*mx.quantize(rope_key, width, self.bits), group_size=width, bits=self.bits)
        return super().update_and_fetch(latent, q.astype(rope_key.dtype))


class WithCaches:
    """The model, with `make_cache` giving the cache under test."""

    def __init__(self, model, make):
        self.model, self.make = model, make

    def __call__(self, x, cache=None):
        return self.model(x, cache=cache)

    def make_cache(self, *_):
        return [self.make() for _ in self.model.layers]


def v3_bytes(bits, rope_bits) -> int:
    args = ModelArgs.from_dict(json.loads((CONFIGS / "DeepSeek-V3.json").read_text()))
    size = latent_bytes_per_token(args, mx.bfloat16, bits, 64)
    if rope_bits:  # the RoPE key in one group: packed values plus a bf16 scale and bias
        size += args.qk_rope_head_dim * rope_bits // 8 + 4 - args.qk_rope_head_dim * 2
    return size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.latent_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--windows", type=int, default=4)
    a = p.parse_args(argv)
    model = load_model(TINYSEEK)
    ids = np.load(TINYSEEK / "validation" / "val_ids.npy")
    batches = windows(ids[-(a.window * a.windows + 1):], a.window, a.windows)
    variants = [("8-bit latent", 8, None), ("8-bit latent + RoPE key", 8, 8),
                ("4-bit latent", 4, None), ("4-bit latent + RoPE key", 4, 4)]
    rows = []
    for name, bits, rope_bits in variants:
        cls = RopeKeyQuantized if rope_bits else QuantizedLatentCache
        q = quality(WithCaches(model, lambda: cls(bits, GROUP)), batches, reference=model, batch_size=2, kv_bits=bits)
        rows.append({"cache": name, "v3_bytes_per_token_layer": v3_bytes(bits, rope_bits), "kl_mean": q.kl_mean,
                     "kl_max": q.kl_max, "top1_agreement": q.top1_agreement, "greedy_flips": q.greedy_flips,
                     "kl_by_context": q.kl_by_context})
    contexts = list(rows[0]["kl_by_context"])
    header = ["cache", "V3 bytes/token/layer", "mean KL"] + [f"KL at {c}" for c in contexts] + ["top-1", "flips"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines.append(f"| plain | {v3_bytes(None, None)} | 0 |" + " 0 |" * len(contexts) + " 1 | 0 |")
    for r in rows:
        lines.append(f"| {r['cache']} | {r['v3_bytes_per_token_layer']} | {r['kl_mean']:.5f} | "
                     + " | ".join(f"{r['kl_by_context'][c]:.5f}" for c in contexts)
                     + f" | {r['top1_agreement']:.4f} | {r['greedy_flips']:.4f} |")
    table = "\n".join(lines)
    print(f"tinyseek, {len(batches)} windows of {a.window} validation tokens, group size {GROUP}; {machine()}")
    print(table)
    out = results_dir()
    (out / "latent_cache.md").write_text(table + "\n")
    (out / "latent_cache.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
