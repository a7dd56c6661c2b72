"""Decode and prefill speed and memory, mlx-deepseek against mlx-lm on the same 4-bit checkpoint.

For each shape (DeepSeek-V2-Lite: deepseek_v2; DeepSeek-V3: deepseek_v3; real widths, fewer
layers and experts) the runners alternate, several repetitions each, after a warm-up and after
checking that both produce the same greedy tokens. Decode at a context of C tokens starts from a
cache filled with C random entries (its content does not change the work), so long contexts
cost no prefill. Activations are float32 on this CPU (MLX's CPU bf16 kernels are ~8x slower);
on a Mac, convert with the default bf16.

    python -m bench.runtime [--quick] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx.core as mx

from bench.common import converted, greedy, load_both, machine, summary, timed
from bench.synthetic import ROOT

SHAPES = {"deepseek_v2": ("DeepSeek-V2-Lite", 2, 16), "deepseek_v3": ("DeepSeek-V3", 4, 16)}
FULL = {"contexts": [0, 1024, 4096, 16384], "prompts": [128, 512, 2048], "appended": [4096, 16384], "steps": 16}
QUICK = {"contexts": [0, 256], "prompts": [32], "appended": [256], "steps": 4}


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
    config, layers, experts = SHAPES[family]
    runners = load_both(converted(config, layers, experts))
    prompt = mx.array([5, 17, 300, 41, 7, 99, 1000, 3])
    tokens = {name: greedy(model, make(), prompt, 12) for name, model, make in runners}
    same = len(set(map(tuple, tokens.values()))) == 1
    if not same:
        print(f"WARNING {family}: the runners disagree on greedy tokens: {tokens}", file=sys.stderr)

    cases = [("decode", c, 1) for c in sizes["contexts"]]
    cases += [("prefill", 0, n) for n in sizes["prompts"]]
    cases += [("prefill", c, 256) for c in sizes["appended"]]
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
        for name, model, make in runners:
            mx.reset_peak_memory()
            cache = filled(make, model, max(context, 1))
            mx.eval(model(mx.array([[3]]), cache=cache))
            per_token = sum(c.nbytes for c in cache) / max(c.offset for c in cache) if context else 0
            peak[name] = {"peak_gb": mx.get_peak_memory() / 1e9, "cache_bytes_per_token": per_token}
        rows.append({"family": family, "kind": kind, "context": context, "tokens": length, "same_tokens": same,
                     **{name: {**summary(v), **peak[name]} for name, v in results.items()}})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\nmlx-deepseek vs mlx-lm, 4-bit, float32 activations ({machine()})\n")
    print("| shape | case | ours tok/s | mlx-lm tok/s | ratio | ours cache B/token | mlx-lm cache B/token | same tokens |")
    print("|---|---|---:|---:|---:|---:|---:|:-:|")
    for r in rows:
        o, t = r["mlx-deepseek"], r["mlx-lm"]
        case = f"decode @ {r['context']}" if r["kind"] == "decode" else (
            f"prefill {r['tokens']}" + (f" on {r['context']}" if r["context"] else ""))
        spread = f" ({o['min']:.1f}-{o['max']:.1f})" if o["n"] > 1 else ""
        print(f"| {r['family']} | {case} | {o['median']:.1f}{spread} | {t['median']:.1f} | {o['median'] / t['median']:.2f} | "
              f"{o['cache_bytes_per_token']:.0f} | {t['cache_bytes_per_token']:.0f} | {'yes' if r['same_tokens'] else 'NO'} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (a smoke test)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--family", choices=list(SHAPES), nargs="+", default=list(SHAPES))
    a = p.parse_args(argv)
    sizes, reps = (QUICK, 1) if a.quick else (FULL, a.reps)
    rows = [r for family in a.family for r in run_shape(family, sizes, reps)]
    print_table(rows)
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    (out / ("runtime-quick.json" if a.quick else "runtime.json")).write_text(
        json.dumps({"machine": machine(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
