"""What per-expert bit widths cost at run time: one layer's routed experts (DeepSeek-V2-Lite's
shapes: 64 experts of 2048 -> 1408, 6 per token) as one 3-bit stack against the same experts split
into stacks of several widths at the same average, for a decode step and a prefill chunk.

    python -m bench.mixed_experts [--reps 20]

Every stack runs all of a step's token-expert pairs (static shapes), so a layer with n widths
does up to n times the expert arithmetic; on a compute-bound CPU that is what the ratio shows.
On a Mac, decoding is bound by reading weights, which the split does not add to; run it there.
"""

from __future__ import annotations

import argparse
import json
import statistics

import mlx.core as mx
import mlx.nn as nn

from bench.common import machine, timed
from bench.synthetic import results_dir
from mlx_deepseek.models.moe import MixedPrecisionExperts, RoutedExperts

DIMS, HIDDEN, EXPERTS, TOP_K = 2048, 1408, 64, 6
LAYOUTS = {"one stack, 3 bits": [3] * 64, "2 widths: 4 and 2 bits": [4, 2] * 32,
           "3 widths: 4, 3 and 2 bits": [4, 3, 2] * 21 + [3]}


def bits_of(path: str) -> int:
    """"bits4.gate_proj" -> 4; a single stack's "gate_proj" -> 3."""
    head = path.split(".")[0]
    return int(head[4:]) if head.startswith("bits") else 3


def quantized(module: nn.Module) -> nn.Module:
    nn.quantize(module, class_predicate=lambda path, m: hasattr(m, "to_quantized")
                and {"group_size": 64, "bits": bits_of(path)})
    mx.eval(module.parameters())
    return module


def median_seconds(module, x, indices, reps: int) -> float:
    mx.eval(module(x, indices))  # warm up
    return statistics.median(timed(lambda: mx.eval(module(x, indices))) for _ in range(reps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mixed_experts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--small", action="store_true", help="toy widths (a smoke test)")
    a = p.parse_args(argv)
    dims, hidden = (256, 128) if a.small else (DIMS, HIDDEN)
    mx.random.seed(0)
    rows = []
    for name, bits in LAYOUTS.items():
        module = RoutedExperts(dims, hidden, EXPERTS) if len(set(bits)) == 1 else MixedPrecisionExperts(dims, hidden, bits)
        module = quantized(module)
        row = {"layout": name, "bits_per_expert_weight": sum(bits) / len(bits)}
        for phase, tokens in (("decode", 1), ("prefill", 128)):
            x = mx.random.normal((1, tokens, dims))
            indices = mx.random.randint(0, EXPERTS, (1, tokens, TOP_K))
            row[f"{phase}_ms"] = 1e3 * median_seconds(module, x, indices, a.reps if tokens == 1 else max(3, a.reps // 5))
        rows.append(row)
    base = rows[0]
    lines = ["| layout | bits per expert weight | decode ms | vs one stack | prefill 128 ms | vs one stack |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['bits_per_expert_weight']:.2f} | {r['decode_ms']:.2f} | "
                     f"{r['decode_ms'] / base['decode_ms']:.2f}x | {r['prefill_ms']:.1f} | "
                     f"{r['prefill_ms'] / base['prefill_ms']:.2f}x |")
    table = "\n".join(lines)
    print(f"{machine()}; float32 activations")
    print(table)
    (results_dir() / "mixed_experts.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
