"""Decode and prefill speed and memory, mlx-deepseek against mlx-lm on the same 4-bit checkpoint.

For each shape (DeepSeek-V2-Lite: deepseek_v2; DeepSeek-V3: deepseek_v3; real widths, fewer
layers and experts) the runners alternate, several repetitions each, after a warm-up and after
checking that both produce the same greedy tokens. Decode at a context of C tokens starts from a
cache filled with C random entries (its content does not change the work), so long contexts
cost no prefill. Activations are float32 on this CPU (MLX's CPU bf16 kernels are ~8x slower);
on a Mac, convert with the default bf16.

    python -m bench.runtime [--profile full|cpu|quick] [--reps 3]

Profiles: `full` is the matrix to run on a Mac (real vocabularies; decode at 0/1k/4k/16k,
prefill 128/512/2048 and a 256-token chunk on 4k/16k caches). `cpu` is what finishes in minutes
on a 2-core Linux box whose quantized matmul runs at ~1 GMAC/s: real layer shapes, one dense and
one MoE layer for V2-Lite and a single MoE layer for V3, 16 experts, an 8k vocabulary, shorter
prompts. `quick` runs the script on the tinyseek shape (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx.core as mx

from bench.common import converted, greedy, load_both, machine, summary, timed
from bench.synthetic import results_dir

# family -> (config, layers, routed experts, vocabulary or None for the real one, dense layers or None)
PROFILES = {
    "full": {"shapes": {"deepseek_v2": ("DeepSeek-V2-Lite", 2, 16, None, None),
                        "deepseek_v3": ("DeepSeek-V3", 4, 16, None, None)},
             "contexts": [0, 1024, 4096, 16384], "prompts": [128, 512, 2048], "appended": [4096, 16384],
             "chunk": 256, "steps": 16},
    "cpu": {"shapes": {"deepseek_v2": ("DeepSeek-V2-Lite", 2, 16, 8192, None),
                       "deepseek_v3": ("DeepSeek-V3", 1, 16, 8192, 0)},
            "contexts": [0, 1024, 4096, 16384], "prompts": [32, 128], "appended": [4096, 16384],
            "chunk": 32, "steps": 6},
    "quick": {"shapes": {"deepseek_v3": ("tinyseek", 2, 16, None, None)},
              "contexts": [0, 64], "prompts": [16], "appended": [64], "chunk": 8, "steps": 2},
}


def filled(make_cache, model, context: int):
    """A cache holding `context` random entries, shaped as the runner's own cache would be."""
    cache = make_cache()
    model(mx.array([[1]]), cache=cache)
    if context:
        for c in cache:
            arrays = tuple(mx.random.normal((*a.shape[:2], context, a.shape[3])).astype(a.dtype)
                           for a in c.state if isinstance(a, mx.array))
            c.state = arrays + ((context,) if len(c.state) == 3 else ())  # mlx-lm's KVCache also holds its offset
    mx.eval([c.state for c in cache])
    return cache


def decode_tps(model, make_cache, context: int, steps: int) -> float:
    cache = filled(make_cache, model, context)
    y = mx.array([[2]])
    for _ in range(2):  # warm-up
        mx.eval(model(y, cache=cache))
    seconds = timed(lambda: [mx.eval(model(y, cache=cache)) for _ in range(steps)])
    return steps / seconds


def prefill_tps(model, make_cache, cached: int, length: int) -> float:
    cache = filled(make_cache, model, cached)
    prompt = mx.random.randint(0, 1000, (1, length))
    mx.eval(prompt)
    seconds = timed(lambda: mx.eval(model(prompt, cache=cache)))
    return length / seconds


def run_shape(family: str, sizes: dict, reps: int) -> list[dict]:
    runners = load_both(converted(*sizes["shapes"][family]))
    prompt = mx.array([5, 17, 300, 41, 7, 99, 1000, 3])
    tokens = {name: greedy(model, make(), prompt, 12) for name, model, make in runners}
    same = len(set(map(tuple, tokens.values()))) == 1
    if not same:
        print(f"WARNING {family}: the runners disagree on greedy tokens: {tokens}", file=sys.stderr)

    cases = [("decode", c, 1) for c in sizes["contexts"]]
    cases += [("prefill", 0, n) for n in sizes["prompts"]]
    cases += [("prefill", c, sizes["chunk"]) for c in sizes["appended"]]
    rows = []
    for kind, context, length in cases:
        results = {name: [] for name, _, _ in runners}
        for rep in range(reps):
            order = runners if rep % 2 == 0 else runners[::-1]
            for name, model, make in order:
                if kind == "decode":
                    results[name].append(decode_tps(model, make, context, sizes["steps"]))
                else:
                    results[name].append(prefill_tps(model, make, context, length))
        peak = {}
        for name, model, make in runners:  # the case itself once more, with the peak counter reset
            mx.clear_cache()
            mx.reset_peak_memory()
            if kind == "decode":
                decode_tps(model, make, context, 1)
            else:
                prefill_tps(model, make, context, length)
            cache = filled(make, model, 1)
            per_token = sum(a.nbytes // a.shape[2] for c in cache for a in c.state if isinstance(a, mx.array))
            peak[name] = {"peak_gb": mx.get_peak_memory() / 1e9, "cache_bytes_per_token": per_token}
        rows.append({"family": family, "kind": kind, "context": context, "tokens": length, "same_tokens": same,
                     **{name: {**summary(v), **peak[name]} for name, v in results.items()}})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\nmlx-deepseek vs mlx-lm, 4-bit, float32 activations ({machine()})\n")
    print("| shape | case | ours tok/s | mlx-lm tok/s | ratio | ours cache B/token | mlx-lm cache B/token "
          "| ours peak GB | mlx-lm peak GB | same tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|:-:|")
    for r in rows:
        o, t = r["mlx-deepseek"], r["mlx-lm"]
        case = f"decode @ {r['context']}" if r["kind"] == "decode" else (
            f"prefill {r['tokens']}" + (f" on {r['context']}" if r["context"] else ""))
        spread = f" ({o['min']:.1f}-{o['max']:.1f})" if o["n"] > 1 else ""
        print(f"| {r['family']} | {case} | {o['median']:.1f}{spread} | {t['median']:.1f} | {o['median'] / t['median']:.2f} | "
              f"{o['cache_bytes_per_token']:.0f} | {t['cache_bytes_per_token']:.0f} | {o['peak_gb']:.2f} | "
              f"{t['peak_gb']:.2f} | {'yes' if r['same_tokens'] else 'NO'} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=list(PROFILES), default="full")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    sizes = PROFILES[a.profile]
    reps = 1 if a.profile == "quick" else a.reps
    rows = [r for family in sizes["shapes"] for r in run_shape(family, sizes, reps)]
    print_table(rows)
    out = results_dir()
    (out / f"runtime-{a.profile}.json").write_text(
        json.dumps({"machine": machine(), "profile": a.profile, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
