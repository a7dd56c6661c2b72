"""What MTP speculative decoding can gain: cost of verifying 2 or 3 tokens against a 1-token step on
a DeepSeek-V3-shaped 4-bit model, the projected speedup for acceptance rates 0.5-0.95, and how
much consecutive tokens share their experts (a verify step of n tokens reads the union of their
experts, so on a bandwidth-bound Mac its MoE cost grows with that union).

    python -m bench.mtp [--profile cpu|quick]

Expert overlap and measured acceptance come from shared/models/tinyseek-py (trained; random
weights route at random). The projection charges the MTP layer 1/61 of a main step (one extra
layer beside R1's 61) per draft.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import mlx.core as mx
import numpy as np

from bench.common import converted, machine, timed
from bench.runtime import filled
from bench.synthetic import TINYSEEK, results_dir

PROFILES = {"cpu": (("DeepSeek-V3", 1, 16, 8192, 0), 1024, 5), "quick": (("tinyseek", 2, 16, None, None), 64, 2)}
REAL_LAYERS = 61


def step_costs(model, context: int, reps: int) -> dict[int, float]:
    """Median seconds of a forward pass of n = 1, 2, 3 new tokens on a cache of `context` tokens."""
    costs = {}
    for n in (1, 2, 3):
        cache = filled(model.make_cache, model, context)
        tokens = mx.array([[7, 8, 9][:n]])
        times = []
        for _ in range(reps + 1):
            times.append(timed(lambda: mx.eval(model(tokens, cache=cache))))
            for c in cache:
                c.trim(n)
        costs[n] = statistics.median(times[1:])
    return costs


def expert_overlap(windows: int = 24) -> dict:
    """Over validation text: experts shared by consecutive tokens, and distinct experts per 1/2/3 tokens."""
    from mlx_deepseek import load_model
    from mlx_deepseek.models.moe import Router

    model = load_model(TINYSEEK)
    chosen = []
    original = Router.__call__

    def recording(self, x):
        indices, weights = original(self, x)
        chosen.append(np.array(indices[0]))
        return indices, weights

    ids = np.load(TINYSEEK / "validation" / "val_ids.npy")
    shared, unions = [], {1: [], 2: [], 3: []}
    Router.__call__ = recording
    try:
        for w in np.linspace(0, len(ids) - 300, windows).astype(int):
            chosen.clear()
            mx.eval(model(mx.array(ids[None, w : w + 256])))
            for layer in chosen:  # (256, k) per MoE layer
                sets = [set(row) for row in layer]
                k = len(sets[0])
                shared += [len(a & b) / k for a, b in zip(sets, sets[1:])]
                for n in unions:
                    unions[n] += [len(set().union(*sets[i : i + n])) / k for i in range(len(sets) - n + 1)]
    finally:
        Router.__call__ = original
    return {"shared_with_next": float(np.mean(shared)),
            "distinct_experts_per_k": {n: float(np.mean(v)) for n, v in unions.items()}}


def measured_acceptance() -> dict:
    from mlx_deepseek import load
    from mlx_deepseek.generate import stream_generate

    model, tokenizer = load(TINYSEEK, mtp=True)
    ids = np.load(TINYSEEK / "validation" / "val_ids.npy")
    accepted = drafted = steps = tokens = 0
    for start in np.linspace(0, len(ids) - 200, 16).astype(int):
        s = list(stream_generate(model, tokenizer, ids[start : start + 64].tolist(), max_tokens=64, mtp=True))[-1].stats
        accepted, drafted, steps, tokens = accepted + s.accepted, drafted + s.drafted, steps + s.main_steps, tokens + s.generation_tokens
    return {"acceptance": accepted / drafted, "tokens_per_main_step": tokens / steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=list(PROFILES), default="cpu")
    a = p.parse_args(argv)
    shape, context, reps = PROFILES[a.profile]
    from mlx_deepseek import load_model

    costs = step_costs(load_model(converted(*shape)), context, reps)
    r2, r3 = costs[2] / costs[1], costs[3] / costs[1]
    m = 1 / REAL_LAYERS
    projection = [{"acceptance": acc, "draft_1": (1 + acc) / (r2 + m), "draft_2": (1 + acc + acc**2) / (r3 + 2 * m)}
                  for acc in (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)]
    overlap = expert_overlap(4 if a.profile == "quick" else 24)
    accept = measured_acceptance()

    print(f"\nMTP verify cost, {shape[0]} shape 4-bit, float32 activations, cache of {context} ({machine()})\n")
    print("| tokens per step | ms | relative to 1 |\n|---:|---:|---:|")
    for n, c in costs.items():
        print(f"| {n} | {c * 1000:.1f} | {c / costs[1]:.2f} |")
    print("\n| acceptance | projected speedup, 1 draft | 2 drafts |\n|---:|---:|---:|")
    for row in projection:
        print(f"| {row['acceptance']:.2f} | {row['draft_1']:.2f}x | {row['draft_2']:.2f}x |")
    d = overlap["distinct_experts_per_k"]
    print(f"\ntinyseek (trained): consecutive tokens share {overlap['shared_with_next']:.0%} of their experts; "
          f"distinct experts read by a step of 1/2/3 tokens: {d[1]:.2f}k / {d[2]:.2f}k / {d[3]:.2f}k")
    print(f"tinyseek MTP: acceptance {accept['acceptance']:.1%}, {accept['tokens_per_main_step']:.2f} tokens per main step")
    out = results_dir()
    (out / f"mtp-{a.profile}.json").write_text(json.dumps(
        {"machine": machine(), "step_seconds": costs, "projection": projection, "overlap": overlap, **accept}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
