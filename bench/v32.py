"""DeepSeek-V3.2 (sparse attention) beside mlx-lm's `deepseek_v32` on the same converted checkpoint:
decode by context, a prompt chunk on a long cache, peak memory, cache bytes per token.
`python -m bench.v32 [--profile toy|cpu|chunk]`.

The model (`cpu` profile): V3.2's real layer shapes (hidden 7168, 128 heads, latent 512 + 64, a
64 x 128 indexer choosing 2048) with one MoE layer of 16 experts (8 active, as V3.2) and an 8k
vocabulary; random bf16 weights converted to 4 bits (`python -m convert -q --dtype float32`:
activations in float32, what runs fast on a CPU), loaded by both runners from that folder.

Decoding at context T needs a cache holding T tokens. Prefilling 64k tokens is hours on this CPU, so
each runner's cache is filled with the SAME random values of exactly the shapes T tokens leave
(latents, RoPE keys, indexer keys); the work per decoded token is that of a real prefill. On the same
filled cache both runners must then produce the same logits, below the boundary and past it: the
script checks that (`max_rel_diff`). "dense" is our runtime with the indexer switched off (top-k
larger than any context): plain MLA, the cost V3 pays.

Greedy tokens are also compared from a real (short) prompt, below the boundary.

DENSE_AT_64K: the dense runner is not run past `dense_max` (16k): at 64k its decode step ends in a
segmentation fault inside MLX's CPU BLAS on this machine (the same MLA call on bare arrays of those
shapes runs), so that column is left empty rather than measured wrongly.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import numpy as np

from bench.common import converted, machine, summary
from bench.synthetic import results_dir

TOY = dict(hidden_size=256, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
           qk_rope_head_dim=32, v_head_dim=32, moe_intermediate_size=128, intermediate_size=256,
           index_n_heads=8, index_head_dim=64, index_topk=64)

PROFILES = {
    # the whole script at toy dimensions (the tests run it): not a measurement
    "toy": {"shape": TOY, "decode": [32, 256], "chunks": [(32, 256)], "steps": 2, "reps": 1, "prompt": 16},
    "cpu": {"shape": {}, "decode": [1024, 2048, 4096, 16384, 65536], "chunks": [(256, 4096), (256, 16384)],
            "steps": 3, "reps": 2, "prompt": 32, "dense_max": 16384},
    # the cpu profile's first chunk row alone, one timed run (the whole cpu profile takes hours here)
    "chunk": {"shape": {}, "decode": [], "chunks": [(256, 4096)], "steps": 3, "reps": 1, "prompt": 32},
}


def load_runners(folder):
    """[(name, model, make_cache, fill)]: ours, ours with the indexer off, mlx-lm."""
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_deepseek import load_model

    ours = load_model(folder)
    dense = load_model(folder)
    for layer in dense.layers:
        layer.self_attn.indexer.topk = 1 << 40
    theirs, _ = mlx_lm.load(str(folder))
    return [("mlx-deepseek", ours, ours.make_cache, fill_ours), ("dense MLA (ours, no indexer)", dense,
                                                                  dense.make_cache, fill_ours),
            ("mlx-lm", theirs, lambda: make_prompt_cache(theirs), fill_mlx_lm)]


def random_state(args, layers: int, context: int) -> list[tuple]:
    """Per layer: (latent, RoPE key, indexer key), each (1, 1, context, width), float32."""
    mx.random.seed(context)
    widths = (args.kv_lora_rank, args.qk_rope_head_dim, args.index_head_dim)
    state = [tuple(mx.random.normal((1, 1, context, w)) for w in widths) for _ in range(layers)]
    mx.eval(state)
    return state


def fill_ours(cache, state):
    for c, arrays in zip(cache, state):
        c.state = list(arrays)


def fill_mlx_lm(cache, state):
    for c, (latent, rope, index) in zip(cache, state):
        c[0].update_and_fetch(latent, rope)
        c[1].update_and_fetch(index, index)
        c[1].values = mx.zeros_like(c[1].keys)  # as mlx-lm's indexer leaves it
        mx.eval(c[0].keys, c[0].values, c[1].keys, c[1].values)


def cache_bytes(cache) -> int:
    return sum(c.nbytes for c in cache)


def run_on_filled(model, make_cache, fill, state, tokens: mx.array, reps: int):
    """Time a forward of `tokens` (a decode step or a chunk) on a freshly filled cache, `reps` times
    after one warm-up; (seconds per forward, peak bytes, last logits, cache bytes per held token).
    One untimed token runs first on each filled cache, so that the buffers have grown past the
    filled length (both runners grow theirs in steps of 256 tokens) before the timed forward."""
    times, logits = [], None
    mx.reset_peak_memory()
    for _ in range(reps + 1):
        cache = make_cache()
        fill(cache, state)
        mx.eval(model(mx.array([[5]]), cache=cache))
        start = time.perf_counter()
        logits = model(tokens, cache=cache)
        mx.eval(logits)
        times.append(time.perf_counter() - start)
    held = state[0][0].shape[2] + 1 + tokens.shape[1]
    return times[1:], mx.get_peak_memory(), np.array(logits[0, -1]), cache_bytes(cache) / held


def attention_only(name, model, make_cache, fill, state, L: int, reps: int) -> dict:
    """The first layer's attention alone (projections, indexer, attention) for L new tokens on the
    filled cache: the part of a step that depends on the context."""
    from mlx_lm.models.base import create_attention_mask

    times = []
    x = mx.random.normal((1, L, model.args.hidden_size), key=mx.random.key(3)) * 0.5
    for _ in range(reps + 1):
        cache = make_cache()
        fill(cache, state)
        layer = model.layers[0].self_attn
        if name == "mlx-lm":  # its model builds the mask on the cache's offset before the layers
            run = lambda: layer(x, create_attention_mask(x, cache[0][0], return_array=True)  # noqa: E731
                                if L > 1 else None, cache[0])
        else:
            run = lambda: layer(x, cache[0])  # noqa: E731
        mx.eval(run())  # the buffers grow past the filled length first (untimed), as in a real step
        start = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - start)
    return summary([1e3 * t for t in times[1:]])


def rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def greedy_agree(runners, prompt_len: int, steps: int) -> dict:
    """Greedy tokens from a real prompt (below the boundary) in each runner."""
    from bench.common import greedy

    prompt = mx.array(np.random.RandomState(0).randint(2, 200, prompt_len))
    out = {name: greedy(model, make_cache(), prompt, steps) for name, model, make_cache, _ in runners}
    return {"tokens": out, "same": len({tuple(v) for v in out.values()}) == 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.v32", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    a = p.parse_args(argv)
    prof = PROFILES[a.profile]
    folder = converted("DeepSeek-V3.2", 1, 16, 8192, dense_layers=0, overrides=prof["shape"] or None)
    runners = load_runners(folder)
    args = runners[0][1].args
    result = {"machine": machine(), "profile": a.profile, "folder": folder.name, "index_topk": args.index_topk,
              "decode": [], "chunks": []}
    result["greedy"] = greedy_agree(runners, prof["prompt"], 16)
    print(f"greedy tokens below the boundary agree: {result['greedy']['same']}", flush=True)
    step = mx.array([[7]])
    for T in prof["decode"]:
        state = random_state(args, len(runners[0][1].layers), T)
        row = {"context": T}
        for name, model, make_cache, fill in runners:
            if name.startswith("dense") and T > prof.get("dense_max", T):
                continue  # see DENSE_AT_64K
            times, peak, logits, per_token = run_on_filled(model, make_cache, fill, state, step, prof["reps"])
            row[name] = {"ms": summary([1e3 * t for t in times]), "peak_gb": peak / 1e9,
                         "cache_bytes_per_token_allocated": per_token, "logits": logits,
                         "attention_ms": attention_only(name, model, make_cache, fill, state, 1, prof["reps"])}
        ref = row["mlx-deepseek"].pop("logits")
        for name, *_ in runners[1:]:
            if name in row:
                row[name]["max_rel_diff"] = rel(row[name].pop("logits"), ref)
        result["decode"].append(row)
        save(result, a.profile)
        print(f"decode @ {T:>6}: " + ", ".join(f"{n} {row[n]['ms']['median']:.1f} ms (attention "
                                                 f"{row[n]['attention_ms']['median']:.1f})" for n, *_ in runners
                                                 if n in row)
              + f" | mlx-lm vs ours {row['mlx-lm']['max_rel_diff']:.1e}", flush=True)
        del state
    for n, T in prof["chunks"]:
        state = random_state(args, len(runners[0][1].layers), T)
        chunk = mx.array(np.random.RandomState(1).randint(2, 200, (1, n)))
        row = {"chunk": n, "context": T}
        for name, model, make_cache, fill in runners:
            times, peak, logits, _ = run_on_filled(model, make_cache, fill, state, chunk, prof["reps"])
            row[name] = {"ms": summary([1e3 * t for t in times]), "peak_gb": peak / 1e9, "logits": logits,
                         "attention_ms": attention_only(name, model, make_cache, fill, state, n, prof["reps"])}
        ref = row["mlx-deepseek"].pop("logits")
        for name, *_ in runners[1:]:
            row[name]["max_rel_diff"] = rel(row[name].pop("logits"), ref)
        result["chunks"].append(row)
        save(result, a.profile)
        print(f"chunk {n} on {T:>6}: " + ", ".join(f"{k} {row[k]['ms']['median']:.0f} ms (attention "
                                                    f"{row[k]['attention_ms']['median']:.0f})" for k, *_ in runners)
              + f" | mlx-lm vs ours {row['mlx-lm']['max_rel_diff']:.1e}", flush=True)
        del state
    print(f"wrote {save(result, a.profile)}")
    return 0


def save(result: dict, profile: str):
    """Written after every row, so that a run cut short keeps what it measured."""
    out = results_dir() / f"v32-{profile}.json"
    out.write_text(json.dumps(result, indent=1))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
