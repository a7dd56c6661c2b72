"""Routed experts streamed from disk (`load(..., expert_memory_gb=)`): what each budget and policy
reads per token, what it costs here, and a labelled projection for real Macs.

    python -m bench.experts_on_disk [--tokens 512] [--timed-tokens 48]

1. Hit rate and bytes read per decoded token versus the budget (slots per layer of 16 experts) for
   each policy, on tinyseek (trained routing) over real text: the router's picks of every token
   are recorded once from the resident 4-bit model, then replayed through `ExpertPool` (the
   streaming code's own bookkeeping; routing is the same whatever the budget, since streaming is
   exact). Policies: LRU, frequency-aware (LFU), and pinned (half the slots hold the experts a
   calibration run on other text picked most, the rest LRU). A baseline replays the same picks
   in shuffled token order: what is left without temporal locality.
2. Prefetch, measured on the same replay: how many of a layer's picks its router guesses from the
   previous MoE layer's input (what a read could start on while that layer computes), and what
   prefetching those guesses saves in reads that stall and costs in extra reads.
   Prefill: distinct experts per layer per chunk (each read once per chunk) for chunk sizes.
3. Decode tok/s here, streamed (real reads: page cache dropped before every token, or hot)
   against resident, and the live run's hit rate against the replay's.
4. Streamed decoding on DeepSeek-V2-Lite's real layer shapes (random weights), against resident.
   The read path's GB/s on R1-sized experts (pread into MLX buffers, and with the slot writes),
   against a plain memcpy of the same bytes.
5. A projection for R1 on 192 / 128 GB Macs and V4-Flash on 64 GB (arithmetic, labelled).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from bench.common import machine
from bench.synthetic import CACHE, CONFIGS, TINYSEEK, results_dir
from mlx_deepseek.models.expert_pool import ExpertPool, ExpertStats
from mlx_deepseek.models.moe import MoE

POLICIES = ("lru", "lfu", "pinned", "lru, shuffled tokens")


def tinyseek_4bit() -> Path:
    out = CACHE / "tinyseek-4bit"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "convert", "--hf-path", str(TINYSEEK), "--mlx-path", str(out), "-q"],
                       check=True)
    return out


def record_picks(model, ids: np.ndarray, window: int = 256, predictions: bool = False):
    """The router's picks (MoE layers, tokens, k) of every token of `ids`, run in windows. With
    `predictions`, also what each layer's router picks on the previous MoE layer's input (the
    guess a prefetch could act on while that layer computes), for layers 1.. (layers - 1, tokens, k)."""
    moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoE)]
    picks, guesses = [[] for _ in moes], [[] for _ in moes[1:]]
    routers = [moe.gate for moe in moes]

    def recording(i):
        def route(x):
            indices, weights = routers[i](x)
            picks[i].append(indices)
            if predictions and i + 1 < len(routers):
                guesses[i].append(routers[i + 1](x)[0])
            return indices, weights
        return route

    for i, moe in enumerate(moes):
        moe.gate = recording(i)
    try:
        for start in range(0, len(ids), window):
            model.hidden(mx.array(ids[None, start : start + window]))
            mx.eval([p[-1] for p in picks] + [g[-1] for g in guesses if g])
    finally:
        for moe, router in zip(moes, routers):
            moe.gate = router

    def stacked(lists):
        return np.stack([np.concatenate([np.array(p).reshape(-1, p[0].shape[-1]) for p in layer]) for layer in lists])
    return (stacked(picks), stacked(guesses)) if predictions else stacked(picks)


def recall(guess: np.ndarray, actual: np.ndarray) -> float:
    """Mean share of each token's actual picks that the guess contains."""
    hits = (guess[..., :, None] == actual[..., None, :]).any(axis=-2)
    return float(hits.mean())


def replay_prefetch(picks: np.ndarray, guesses: np.ndarray, slots: int, expert_bytes: int) -> tuple[ExpertStats, ExpertStats]:
    """LRU decoding where each layer's guessed experts are fetched while the previous layer computes:
    (demand reads, which stall, and prefetch reads)."""
    layers, n, _ = picks.shape
    demand, prefetch = ExpertStats(), ExpertStats()
    pools = [ExpertPool(picks.max() + 1, slots, expert_bytes, demand) for _ in range(layers)]
    for t in range(n):
        for layer, pool in enumerate(pools):
            if layer + 1 < layers:  # guess layer+1's experts from this layer's input, fetch them now
                pools[layer + 1].stats = prefetch
                pools[layer + 1].plan(guesses[layer, t][None])
                pools[layer + 1].stats = demand
            pool.plan(picks[layer, t][None])
        demand.tokens += 1
        prefetch.tokens += 1
    return demand, prefetch


def replay(picks: np.ndarray, slots: int, policy: str, counts: np.ndarray, expert_bytes: int) -> ExpertStats:
    """Decode token by token through one pool per layer."""
    layers, n, _ = picks.shape
    experts = counts.shape[1]
    stats = ExpertStats()
    if policy.endswith("shuffled tokens"):
        picks = picks[:, np.random.default_rng(0).permutation(n)]
    pools = []
    for layer in range(layers):
        pinned = np.argsort(-counts[layer], kind="stable")[: slots // 2] if policy == "pinned" else ()
        pools.append(ExpertPool(experts, slots, expert_bytes, stats, "lfu" if policy == "lfu" else "lru", pinned))
    for t in range(n):
        for layer, pool in enumerate(pools):
            pool.plan(picks[layer, t][None])
        stats.tokens += 1
    return stats


def prefill_reads(picks: np.ndarray, chunk: int) -> float:
    """Mean distinct experts per layer per chunk of `chunk` tokens (each read once per chunk)."""
    n = picks.shape[1] // chunk * chunk
    per = [len(np.unique(picks[layer, s : s + chunk])) for layer in range(picks.shape[0]) for s in range(0, n, chunk)]
    return float(np.mean(per))


def timed_decode(folder: Path, ids: np.ndarray, prompt: int, steps: int, budget_gb, cold: bool, reps: int = 5) -> dict:
    """Decode `steps` tokens of real text (teacher-forced, one at a time) after a `prompt`; the
    median of `reps` runs, each from a fresh model (empty slots) and cache."""
    from mlx_deepseek import load_model

    speeds = []
    for _ in range(reps):
        model = load_model(folder, expert_memory_gb=budget_gb)
        stream = getattr(model, "expert_stream", None)
        cache = model.make_cache()
        mx.eval(model(mx.array(ids[None, :prompt]), cache))
        if stream is not None:
            stream.stats.reset()
        seconds = 0.0
        for t in range(prompt, prompt + steps):
            if cold and stream is not None:
                stream.drop_page_cache()
            start = time.perf_counter()
            mx.eval(model(mx.array(ids[None, t : t + 1]), cache))
            seconds += time.perf_counter() - start
        speeds.append(steps / seconds)
        if stream is not None:
            stream.reader.close()
    row = {"tok_s": float(np.median(speeds)), "tok_s_min": min(speeds), "tok_s_max": max(speeds)}
    if stream is not None:
        s = stream.stats
        row.update(hit_rate=s.hit_rate, mb_per_token=s.bytes_read / s.tokens / 1e6,
                   read_ms_per_token=1e3 * s.read_s / s.tokens, syncs_per_token=s.syncs / s.tokens)
    return row


def host_path(experts: int = 12, batch: int = 8, reps: int = 3) -> list[dict]:
    """GB/s of the read path on R1-sized experts (4-bit, 7168 -> 2048, bf16 scales: 24.8 MB each,
    9 ranges): pread from the thread pool alone, and pread + copy into MLX + write into the slots,
    with the page cache dropped before each batch and hot. One layer's stack of `experts`."""
    from safetensors.numpy import save_file

    from mlx_deepseek.experts_on_disk import ExpertReader, _fetcher, disk_entries, locate

    D, H, G = 7168, 2048, 64
    shapes = {"gate_proj": (H, D), "up_proj": (H, D), "down_proj": (D, H)}
    folder = CACHE / f"r1-expert-stack-{experts}"
    if not (folder / "model.safetensors").exists():
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        tensors = {}
        for proj, (out, inp) in shapes.items():
            name = f"model.layers.0.mlp.switch_mlp.{proj}"
            tensors[f"{name}.weight"] = rng.integers(0, 2**32, (experts, out, inp // 8), dtype=np.uint32)
            for part in ("scales", "biases"):
                tensors[f"{name}.{part}"] = rng.standard_normal((experts, out, inp // G)).astype(np.float16)
        save_file(tensors, str(folder / "model.safetensors"))
    entries = disk_entries(folder)
    parts = [f"{proj}.{part}" for proj in shapes for part in ("weight", "scales", "biases")]
    located = [locate("model.layers.0.mlp.switch_mlp", t, experts, entries) for t in parts]
    reader = ExpertReader({t.file for t in located})
    fetch = _fetcher(reader, located, lambda k, v: v)
    per_expert = sum(t.nbytes for t in located)
    slots = {t.name: mx.zeros((batch, *t.shape), dtype=mx.float16 if t.dtype == "F16" else mx.uint32)
             for t in located}
    mx.eval(list(slots.values()))
    rows = []
    for cold in (True, False):
        for what in ("pread into MLX buffers", "pread + into the slots"):
            seconds = []
            for rep in range(reps):
                chosen = [(rep * batch + i) % experts for i in range(batch)]
                if cold:
                    reader.drop_page_cache()
                start = time.perf_counter()
                if what == "pread into MLX buffers":
                    reader.read(located, chosen)
                else:  # as StreamedExperts._load writes them: one slice update per expert
                    data = fetch(chosen)()
                    for t in located:
                        value = data[".".join(t.name.rsplit(".", 2)[1:])]
                        for i in range(batch):
                            slots[t.name][i] = value[i]
                    mx.eval(list(slots.values()))
                seconds.append(time.perf_counter() - start)
            rows.append({"page_cache": "dropped" if cold else "hot", "path": what,
                         "gb_s": batch * per_expert / np.median(seconds) / 1e9, "mb_per_expert": per_expert / 1e6})
    reader.close()
    buf = np.ones(batch * per_expert, dtype=np.uint8)
    start = time.perf_counter()
    for _ in range(reps):
        buf.copy()
    rows.append({"page_cache": "-", "path": "memcpy of the same bytes (this machine's bound)",
                 "gb_s": reps * buf.nbytes / (time.perf_counter() - start) / 1e9, "mb_per_expert": per_expert / 1e6})
    return rows


def budget_gb(model, slots: int) -> float:
    """The expert_memory_gb that gives `slots` experts per streamed layer."""
    from mlx.utils import tree_flatten

    from mlx_deepseek.models.moe import RoutedExperts

    layers = [m for p, m in model.named_modules() if isinstance(m, RoutedExperts) and not p.startswith("mtp")]
    stack = sum(v.nbytes for _, v in tree_flatten(layers[0].parameters()))
    return (slots + 0.5) * stack / layers[0].gate_proj["weight"].shape[0] * len(layers) / 1e9


def shaped_decode(steps: int, reps: int) -> list[dict]:
    """Streamed decoding on DeepSeek-V2-Lite's real layer shapes (2048 -> 1408 experts, top-6; 2 MoE
    layers of 16 experts, random weights: routing without locality), 4-bit, real reads."""
    from bench.common import converted
    from mlx_deepseek import load_model

    folder = converted("DeepSeek-V2-Lite", 3, 16, 4096, 1)
    ids = np.random.default_rng(0).integers(0, 4096, 64 + steps)
    resident = timed_decode(folder, ids, 16, steps, None, False, reps)
    model = load_model(folder)
    rows = [{"run": "resident (16 experts)", **resident, "vs_resident": 1.0}]
    for slots in (8, 12):
        for cold in (True, False):
            row = {"run": f"{slots} slots, page cache {'dropped every token' if cold else 'hot'}",
                   **timed_decode(folder, ids, 16, steps, budget_gb(model, slots), cold, reps)}
            row["vs_resident"] = row["tok_s"] / resident["tok_s"]
            rows.append(row)
    return rows


# -- projection for real Macs (arithmetic on the figures above; nothing here ran on a Mac) ----------------

def model_bytes(config: str, expert_bits: float, other_bits: float) -> dict:
    """Routed-expert bytes (one expert, all experts) and the rest, from a real config's shapes."""
    cfg = json.loads((CONFIGS / config).read_text())
    D, H, E, k = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    moe_layers = cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0)
    expert = 3 * D * H * expert_bits / 8
    total_params = {"DeepSeek-R1.json": 671e9, "DeepSeek-V4-Flash.json": 284e9}[config]  # published totals (no MTP)
    other = (total_params - 3 * D * H * E * moe_layers) * other_bits / 8
    return {"expert": expert, "experts": expert * E * moe_layers, "other": other, "moe_layers": moe_layers,
            "top_k": k, "experts_per_layer": E}


MACS = [  # (label, model config, expert bits, other bits, memory GB, memory bandwidth GB/s)
    ("R1 4-bit on a 192 GB M2 Ultra (800 GB/s)", "DeepSeek-R1.json", 4.5, 4.5, 192, 800),
    ("R1 4-bit on a 128 GB M4 Max (546 GB/s)", "DeepSeek-R1.json", 4.5, 4.5, 128, 546),
    ("V4-Flash (mxfp4 experts, 8-bit rest) on a 64 GB M4 Max (546 GB/s)", "DeepSeek-V4-Flash.json", 4.25, 8.5, 64, 546),
]
RESERVED_GB = 12  # macOS, apps, latent cache and activations (with the GPU wired limit raised)


def project(curves: dict[str, list[tuple[float, float]]]) -> list[dict]:
    rows = []
    for label, config, eb, ob, ram, bw in MACS:
        m = model_bytes(config, eb, ob)
        budget = ram * 1e9 - RESERVED_GB * 1e9 - m["other"]
        fraction = max(0.0, min(1.0, budget / m["experts"]))
        picks = m["top_k"] * m["moe_layers"]
        active = m["other"] + picks * m["expert"]
        for locality, hit in (("none (hit rate = budget share)", fraction),
                              ("tinyseek's LRU at that share", np.interp(fraction, *zip(*curves["lru"])))):
            read = (1 - hit) * picks * m["expert"]
            for ssd in (5, 7):
                seconds = read / (ssd * 1e9) + active / (bw * 1e9)
                rows.append({"mac": label, "budget_share": fraction, "locality": locality, "hit_rate": float(hit),
                             "gb_read_per_token": read / 1e9, "ssd_gb_s": ssd, "tok_s": 1 / seconds,
                             "resident_other_gb": m["other"] / 1e9, "experts_gb": m["experts"] / 1e9})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experts_on_disk", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens of real text replayed")
    p.add_argument("--timed-tokens", type=int, default=48, help="tokens decoded in each timed run")
    p.add_argument("--toy", action="store_true", help="a few tokens and small reads (what the tests run)")
    args = p.parse_args(argv)
    if args.toy:
        args.tokens, args.timed_tokens = 256, 4
    reps, read_experts, read_batch = (1, 3, 2) if args.toy else (5, 12, 8)

    from mlx_deepseek import load_model

    folder = tinyseek_4bit()
    text = np.load(TINYSEEK / "validation" / "val_ids.npy")
    model = load_model(folder)
    calibration = record_picks(model, text[: 2048])
    picks = record_picks(model, text[4096 : 4096 + args.tokens])
    E, k = model.args.n_routed_experts, model.args.num_experts_per_tok
    counts = np.stack([np.bincount(layer.reshape(-1), minlength=E) for layer in calibration])
    one = model.layers[1].mlp.switch_mlp
    expert_bytes = sum(v.nbytes for v in (one.gate_proj.weight, one.gate_proj.scales, one.gate_proj.biases)) * 3 // E
    del model

    print(f"# tinyseek 4-bit: {picks.shape[0]} MoE layers, {E} experts, top-{k}, {expert_bytes / 1e3:.0f} kB "
          f"per expert; {picks.shape[1]} tokens of real text\n")
    print("| slots / 16 (budget) | " + " | ".join(POLICIES) + " |")
    print("|---|" + "---|" * len(POLICIES))
    table, curves = [], {p: [] for p in POLICIES}
    for slots in (2, 4, 6, 8, 12, 16):
        cells = []
        for policy in POLICIES:
            if policy == "pinned" and slots < 4:
                cells.append("—")
                continue
            s = replay(picks, slots, policy, counts, expert_bytes)
            table.append({"slots": slots, "policy": policy, "hit_rate": s.hit_rate,
                          "kb_per_token": s.bytes_read / s.tokens / 1e3})
            curves[policy].append((slots / E, s.hit_rate))
            cells.append(f"{s.hit_rate:.1%}, {s.bytes_read / s.tokens / 1e3:.0f} kB/tok")
        print(f"| {slots} ({slots / E:.0%}) | " + " | ".join(cells) + " |")

    _, guesses = record_picks(load_model(folder), text[4096 : 4096 + args.tokens], predictions=True)
    print("\n| guess of a layer's experts | share of its picks guessed |")
    print("|---|---|")
    prefetch = {"next layer's router on this layer's input": recall(guesses, picks[1:]),
                "the previous token's picks, same layer": recall(picks[:, :-1], picks[:, 1:])}
    for what, r in prefetch.items():
        print(f"| {what} | {r:.1%} |")
    print("\n| slots | LRU: hit rate, kB read/token | with next-layer prefetch: demand hit rate, "
          "stalling kB/token, prefetched kB/token |")
    print("|---|---|---|")
    prefetched = []
    for slots in (4, 8, 12):
        plain = replay(picks, slots, "lru", counts, expert_bytes)
        demand, pre = replay_prefetch(picks, guesses, slots, expert_bytes)
        prefetched.append({"slots": slots, "lru_hit_rate": plain.hit_rate, "demand_hit_rate": demand.hit_rate,
                           "stall_kb_per_token": demand.bytes_read / demand.tokens / 1e3,
                           "prefetch_kb_per_token": pre.bytes_read / pre.tokens / 1e3})
        print(f"| {slots} | {plain.hit_rate:.1%}, {plain.bytes_read / plain.tokens / 1e3:.0f} | "
              f"{demand.hit_rate:.1%}, {demand.bytes_read / demand.tokens / 1e3:.0f}, "
              f"{pre.bytes_read / pre.tokens / 1e3:.0f} |")

    print("\n| prefill chunk (tokens) | distinct experts per layer per chunk | expert reads per prompt token |")
    print("|---|---|---|")
    prefill = []
    for chunk in (1, 4, 16, 64, 256):
        d = prefill_reads(picks, chunk)
        prefill.append({"chunk": chunk, "distinct": d})
        print(f"| {chunk} | {d:.1f} of {E} | {d / chunk:.3f} per layer |")

    print("\n| decode here (tok/s, real reads) | tok/s | vs resident | hit rate (live) | MB read/token | "
          "read ms/token | syncs/token |")
    print("|---|---|---|---|---|---|---|")
    timed = []
    resident = timed_decode(folder, text[6000:], 64, args.timed_tokens, None, False, reps)
    for slots in (4, 8, 12):
        budget = (slots + 0.5) * expert_bytes * picks.shape[0] / 1e9
        for cold in (True, False):
            row = {"slots": slots, "page_cache": "dropped every token" if cold else "hot",
                   **timed_decode(folder, text[6000:], 64, args.timed_tokens, budget, cold, reps)}
            row["vs_resident"] = row["tok_s"] / resident["tok_s"]
            timed.append(row)
            print(f"| {slots} slots, page cache {row['page_cache']} | {row['tok_s']:.1f} | {row['vs_resident']:.2f}x | "
                  f"{row['hit_rate']:.1%} | {row['mb_per_token']:.2f} | {row['read_ms_per_token']:.2f} | "
                  f"{row['syncs_per_token']:.0f} |")
    print(f"| resident (all 16) | {resident['tok_s']:.1f} | 1.00x | | | | |")

    shaped = []
    if not args.toy:
        print("\n| decode, V2-Lite layer shapes (16 experts, random routing) | tok/s | vs resident | hit rate | "
              "MB read/token | read ms/token |")
        print("|---|---|---|---|---|---|")
        shaped = shaped_decode(24, reps)
        for r in shaped:
            print(f"| {r['run']} | {r['tok_s']:.1f} | {r['vs_resident']:.2f}x | {r.get('hit_rate', 1):.0%} | "
                  f"{r.get('mb_per_token', 0):.1f} | {r.get('read_ms_per_token', 0):.1f} |")

    print(f"\n| read path, R1-sized experts ({read_batch} per batch) | page cache | GB/s |")
    print("|---|---|---|")
    throughput = host_path(read_experts, read_batch)
    for r in throughput:
        print(f"| {r['path']} ({r['mb_per_expert']:.1f} MB per expert) | {r['page_cache']} | {r['gb_s']:.2f} |")

    print("\n**Projection, not a measurement** (bytes read per token / SSD speed + active bytes / memory bandwidth,"
          " no overlap):\n")
    print("| Mac | expert budget share | locality assumed | hit rate | GB read/token | SSD GB/s | tok/s |")
    print("|---|---|---|---|---|---|---|")
    projection = project(curves)
    for r in projection:
        print(f"| {r['mac']} | {r['budget_share']:.0%} | {r['locality']} | {r['hit_rate']:.0%} | "
              f"{r['gb_read_per_token']:.2f} | {r['ssd_gb_s']} | {r['tok_s']:.2f} |")

    (results_dir() / "experts_on_disk.json").write_text(json.dumps(
        {"machine": machine(), "replay": table, "guesses": prefetch, "prefetch": prefetched, "prefill": prefill, "read_path": throughput, "v2_lite_shaped": shaped, "timed": timed, "resident": resident,
         "projection": projection}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
