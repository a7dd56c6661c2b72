"""DeepSeek-V4 on this runtime: decode and prefill speed, the cost of each new piece, cache bytes,
and the Mac roofline. `python -m bench.v4 [--profile quick|cpu|full]`.

There is no peer to compare with: mlx-lm has no deepseek_v4 (not in 0.32; its ports are unmerged
branches), so the figures are ours alone, measured on a V4-Flash-shaped model: Flash's real layer
shapes (hidden 4096, 64 heads of 512, q/o low-rank 1024, 8 output groups, a 64x128 indexer picking
512, 4 hyper-connection streams) with fewer layers (one of each kind: sliding, CSA, HCA), 16
experts instead of 256 (6 active, as Flash) and an 8k vocabulary; random weights quantized in
memory to 4 bits (affine, group 64), float32 activations.

Decoding at context T needs a cache that holds T tokens. Prefilling 32k tokens is hours on this
CPU, so the cache is filled with random values of exactly the shapes T tokens leave (the 128-token
window, T/4 CSA entries and indexer keys, T/128 HCA entries): the work per decoded token is the
same as after a real prefill; the values are not.

The roofline is arithmetic from the published Flash config: bytes a decoded token must read
(active weights at 4.5 bits per weight, plus the cache entries it attends to) and the tok/s that
800 GB/s (M3 Ultra / M2 Ultra) allows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from bench.common import machine, summary
from bench.synthetic import results_dir
from mlx_deepseek.models.deepseek_v4 import Model, V4Args
from mlx_deepseek.models.deepseek_v4.cache import v4_values_per_token

SHARED = Path(__file__).resolve().parents[2] / "shared"
FLASH = SHARED / "configs" / "DeepSeek-V4-Flash.json"

TOY = dict(hidden_size=256, num_attention_heads=4, head_dim=128, q_lora_rank=128, o_lora_rank=64, o_groups=2,
           moe_intermediate_size=128, index_n_heads=8, index_head_dim=64, index_topk=16)

PROFILES = {
    # the whole script at toy dimensions (the tests run it): not a measurement
    "toy": {"contexts": [0, 256], "prefill": [16], "steps": 2, "reps": 1, "shape": TOY},
    "quick": {"contexts": [0, 512], "prefill": [16], "steps": 2, "reps": 1},
    "cpu": {"contexts": [0, 4096, 32768], "prefill": [32, 128], "steps": 4, "reps": 2},
    "full": {"contexts": [0, 4096, 32768, 131072], "prefill": [128, 512, 2048], "steps": 16, "reps": 3},
}


def flash_args(layers=(0, 4, 128), experts: int = 16, vocab: int = 8192, shape: dict | None = None) -> V4Args:
    config = {**json.loads(FLASH.read_text()), **(shape or {})}
    config.update(num_hidden_layers=len(layers), compress_ratios=list(layers) + [0], n_routed_experts=experts,
                  vocab_size=vocab, num_hash_layers=0)
    return V4Args.from_dict(config)


def build_model(args: V4Args, bits: int = 4) -> Model:
    model = Model(args)
    keep = ("gate", "hc_", "compressor.norm", "embed")
    nn.quantize(model, group_size=64, bits=bits,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and not any(k in p for k in keep)
                and getattr(m, "weight", mx.zeros((1, 64))).shape[-1] % 64 == 0)
    for _, p in tree_flatten(model.parameters()):
        mx.eval(p)
    return model


def filled_cache(model: Model, context: int) -> list:
    """A cache holding `context` tokens' worth of state (random values, exact shapes)."""
    args, cache = model.args, model.make_cache()
    W, D = args.sliding_window, args.head_dim
    for c in cache:
        c.offset = context
        if context:
            c.window = mx.random.normal((1, 1, min(context, W - 1), D)) * 0.1
        for state in (c.compressor, c.indexer):
            if state is None:
                continue
            n = context // state.ratio
            if n:
                state.append(mx.random.normal((1, n, state.width)) * 0.1)
            left = context % state.ratio
            coff = 2 if state.ratio == 4 else 1
            state.pending_kv = mx.zeros((1, left, coff * state.width))
            state.pending_gate = mx.zeros((1, left, coff * state.width))
            if state.ratio == 4 and n:
                state.prev_kv = mx.zeros((1, 4, state.width))
                state.prev_gate = mx.zeros((1, 4, state.width))
        mx.eval(c.state)
    return cache


def decode_tps(model: Model, context: int, steps: int, reps: int) -> dict:
    times = []
    for _ in range(reps):
        cache = filled_cache(model, context)
        y = mx.array([[1]])
        mx.eval(model(y, cache))  # warm up on this cache
        start = time.perf_counter()
        for _ in range(steps):
            y = mx.argmax(model(y, cache)[:, -1:], axis=-1)
            mx.eval(y)
        times.append(steps / (time.perf_counter() - start))
    return summary(times)


def prefill_tps(model: Model, length: int, reps: int) -> dict:
    times = []
    for _ in range(reps):
        tokens = mx.random.randint(0, model.args.vocab_size, (1, length))
        start = time.perf_counter()
        mx.eval(model(tokens, model.make_cache()))
        times.append(length / (time.perf_counter() - start))
    return summary(times)


def piece_costs(model: Model, context: int, reps: int) -> dict:
    """Milliseconds per decoded token of each piece, on one layer of each kind at `context`."""
    args, cache = model.args, filled_cache(model, context)
    x = mx.random.normal((1, 1, args.hidden_size))
    streams = mx.random.normal((1, 1, args.hc_mult, args.hidden_size))
    tokens = mx.array([[1]])

    def ms(fn):
        mx.eval(fn())
        start = time.perf_counter()
        for _ in range(reps):
            mx.eval(fn())
        return 1000 * (time.perf_counter() - start) / reps

    def snap_restore(c, fn):
        def run():
            s = c.snapshot()
            out = fn()
            mx.eval(out, c.state)  # what it wrote to the cache is part of its work
            c.restore(s)
            return out
        return run

    csa, hca, sliding = (next(i for i, layer in enumerate(model.layers) if layer.attn.ratio == r) for r in (4, 128, 0))
    L = model.layers
    q_latent = L[csa].attn.q_norm(L[csa].attn.wq_a(x))
    visible = mx.ones((1, cache[csa].indexer.count), mx.bool_)
    return {
        "hyper-connections (pre + Sinkhorn + post, 2 per layer)": ms(lambda: [L[0].hc_attn(streams), L[0].hc_ffn(streams)]),
        "attention, sliding layer (incl. its projections)": ms(snap_restore(cache[sliding], lambda: L[sliding].attn(x, cache[sliding]))),
        "attention, HCA layer (incl. its compressor)": ms(snap_restore(cache[hca], lambda: L[hca].attn(x, cache[hca]))),
        "attention, CSA layer (incl. compressor and indexer)": ms(snap_restore(cache[csa], lambda: L[csa].attn(x, cache[csa]))),
        "CSA compressor alone": ms(snap_restore(cache[csa], lambda: L[csa].attn.compressor(x, cache[csa].compressor, L[csa].attn.rope))),
        "CSA indexer alone (its compressor, scores, top-k)": ms(snap_restore(cache[csa], lambda: L[csa].attn.indexer(
            x, q_latent, cache[csa].indexer, L[csa].attn.rope, context, visible))),
        "MoE (router, 6 routed + 1 shared expert)": ms(lambda: L[0].ffn(x, tokens)),
    }


def roofline(config: dict, contexts: list[int], bandwidth: float = 800e9, bits: float = 4.5) -> list[dict]:
    """Bytes a decoded token reads on published V4-Flash at 4 bits, and what `bandwidth` allows."""
    args = V4Args.from_dict(config)
    model = Model(args)  # lazy: only shapes are used
    params = {k: v.size for k, v in tree_flatten(model.parameters())}
    E, k = args.n_routed_experts, args.num_experts_per_tok
    routed = sum(v for n, v in params.items() if ".switch_mlp." in n)
    embed = params["embed.weight"]
    always = sum(params.values()) - routed - embed  # attention, shared experts, router, head, norms
    active = always + routed * k / E + args.hidden_size  # one embedding row
    weight_bytes = active * bits / 8
    rows = []
    for T in contexts:
        cache = 0
        for i in range(args.num_hidden_layers):
            r = args.compress_ratio(i)
            cache += min(T, args.sliding_window) * args.head_dim  # the window
            if r == 4:
                cache += min(T // 4, args.index_topk) * args.head_dim + (T // 4) * args.index_head_dim
            elif r:
                cache += (T // r) * args.head_dim
        cache_bytes = cache * 2  # bf16
        total = weight_bytes + cache_bytes
        rows.append({"context": T, "active_params_b": active / 1e9, "weight_gb": weight_bytes / 1e9,
                     "cache_read_mb": cache_bytes / 1e6, "tok_s_at_800GBs": bandwidth / total})
    return rows


def cache_table(config: dict, contexts: list[int]) -> list[dict]:
    args = V4Args.from_dict(config)
    per_token = v4_values_per_token(args)
    constant = args.num_hidden_layers * (args.sliding_window - 1) * args.head_dim
    return [{"context": T, "values_per_token": per_token,
             "cache_gb_bf16": (constant + per_token * T) * 2 / 1e9} for T in contexts]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.v4", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    prof = PROFILES[a.profile]
    mx.random.seed(0)
    config = json.loads(FLASH.read_text())
    model = build_model(flash_args(shape=prof.get("shape")))
    result = {"machine": machine(), "profile": a.profile, "decode": {}, "prefill": {}}
    for T in prof["contexts"]:
        result["decode"][T] = decode_tps(model, T, prof["steps"], prof["reps"])
        print(f"decode @ {T:>6}: {result['decode'][T]['median']:.2f} tok/s", flush=True)
    for n in prof["prefill"]:
        result["prefill"][n] = prefill_tps(model, n, prof["reps"])
        print(f"prefill {n:>5}: {result['prefill'][n]['median']:.1f} tok/s", flush=True)
    result["pieces_ms"] = {T: piece_costs(model, T, prof["reps"]) for T in (prof["contexts"][0], prof["contexts"][-1])}
    for T, pieces in result["pieces_ms"].items():
        print(f"per-token cost of each piece at context {T}:")
        for name, v in pieces.items():
            print(f"  {v:8.2f} ms  {name}")
    contexts = [0, 4096, 32768, 131072, 1048576]
    result["roofline"] = roofline(config, contexts)
    result["cache"] = cache_table(config, contexts)
    for row in result["roofline"]:
        print(f"roofline @ {row['context']:>7}: {row['weight_gb']:.2f} GB weights + {row['cache_read_mb']:.1f} MB cache "
              f"-> {row['tok_s_at_800GBs']:.1f} tok/s at 800 GB/s")
    for row in result["cache"]:
        print(f"cache @ {row['context']:>7}: {row['cache_gb_bf16']:.3f} GB (bf16)")
    out = a.out or results_dir() / f"v4-{a.profile}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
