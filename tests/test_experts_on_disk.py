"""Routed experts streamed from disk (`load(..., expert_memory_gb=)`): the same logits as resident
experts bit for bit (decode, chunked prefill, quantized cache, batches, MTP), exact hit/byte
accounting, and a shard changed under the model is a clear error."""

import os
import shutil
import warnings

import mlx.core as mx
import numpy as np
import pytest
from conftest import SHARED, tokens

from convert.cli import main as convert_main
from mlx_deepseek import CheckpointError, load, load_model
from mlx_deepseek.experts_on_disk import ExpertFileChanged
from mlx_deepseek.generate import stream_generate
from mlx_deepseek.models.expert_pool import ExpertPool, ExpertStats
from mlx_deepseek.models.moe import RoutedExperts
from mlx_deepseek.models.streamed_experts import StreamedExperts

TINYSEEK = SHARED / "models" / "tinyseek-py"


@pytest.fixture(scope="module")
def quantized_v3(tmp_path_factory):
    """The v3 fixture converted to 4 bits (group 32) with our converter: stacked experts on disk."""
    from checkpoints import build

    dst = tmp_path_factory.mktemp("q") / "v3-4bit"
    assert convert_main(["--hf-path", str(build("v3")), "--mlx-path", str(dst), "-q", "--q-group-size", "32"]) == 0
    return dst


@pytest.fixture(scope="module")
def converted_v4(tmp_path_factory):
    """A DeepSeek-V4 fixture converted with the default recipe: stacked mxfp4 experts (hash layer first)."""
    from checkpoints import build_v4

    dst = tmp_path_factory.mktemp("v4") / "v4-mxfp4"
    assert convert_main(["--hf-path", str(build_v4("v4_small", "hf")), "--mlx-path", str(dst)]) == 0
    return dst


def test_v4_streamed_equals_resident(converted_v4):
    resident, model = streamed(converted_v4, 3)  # top-2 of 8 experts
    run_both(resident, model, mx.array(tokens(40, vocab=resident.args.vocab_size)), chunks=13, decode_steps=5)
    assert len(model.expert_stream.pools) == resident.args.num_hidden_layers


def folder_of(name, checkpoint, quantized_v3):
    return quantized_v3 if name == "v3-4bit" else checkpoint(name)


def budget_for(model, slots: int) -> float:
    """The expert_memory_gb that gives `slots` experts per streamed layer."""
    layers = [m for p, m in model.named_modules() if isinstance(m, RoutedExperts) and not p.startswith("mtp")]
    per_expert = sum(v.nbytes for _, v in _arrays(layers[0])) // layers[0].gate_proj["weight"].shape[0]
    return (slots + 0.5) * per_expert * len(layers) / 1e9


def _arrays(module):
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


def streamed(folder, slots, **kw):
    resident = load_model(folder, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer slots than top_k warns (tested below)
        model = load_model(folder, expert_memory_gb=budget_for(resident, slots), **kw)
    assert model.expert_stream.slots == slots
    return resident, model


def run_both(resident, model, ids, chunks, decode_steps, kv_bits=None):
    """Chunked prefill then greedy decoding on both models; every step's logits compared bit for bit."""
    caches = [m.make_cache(kv_bits, 32) if kv_bits else m.make_cache() for m in (resident, model)]
    logits = None
    for start in range(0, ids.shape[1], chunks):
        chunk = ids[:, start : start + chunks]
        a, b = resident(chunk, caches[0]), model(chunk, caches[1])
        assert mx.array_equal(a, b).item(), f"prefill chunk at {start} differs"
        logits = a
    token = mx.argmax(logits[:, -1:], axis=-1)
    for step in range(decode_steps):
        a, b = resident(token, caches[0]), model(token, caches[1])
        assert mx.array_equal(a, b).item(), f"decode step {step} differs"
        token = mx.argmax(a, axis=-1)


@pytest.mark.parametrize("name,slots", [("v3", 2), ("v3-4bit", 2), ("v3-4bit", 11), ("v2_lite", 5)])
def test_streamed_logits_equal_resident(name, slots, checkpoint, quantized_v3):
    # slots 2 < top_k 3: even decoding runs in rounds; a prefill chunk of 7 tokens needs most experts
    resident, model = streamed(folder_of(name, checkpoint, quantized_v3), slots)
    run_both(resident, model, mx.array(tokens(21)), chunks=7, decode_steps=6)
    assert all(isinstance(layer.mlp.switch_mlp, StreamedExperts) for layer in model.layers[1:])
    assert model.expert_stream.stats.misses > 0


def test_a_bfloat16_folder_loaded_as_float32(checkpoint):
    """Streamed bytes are cast as the resident load casts them (dtype=)."""
    resident, model = streamed(checkpoint("v3", dtype="bfloat16"), 4, dtype=mx.float32)
    assert model.layers[1].mlp.switch_mlp.slots.gate_proj.weight.dtype == mx.float32
    run_both(resident, model, mx.array(tokens(10)), chunks=4, decode_steps=3)


def test_quantized_cache_and_batches(quantized_v3):
    resident, model = streamed(quantized_v3, 4, expert_policy="lru")
    run_both(resident, model, mx.array(tokens(12, batch=2)), chunks=5, decode_steps=4, kv_bits=8)


def test_accounting(quantized_v3):
    resident, model = streamed(quantized_v3, 4)
    stream, stats = model.expert_stream, model.expert_stream.stats
    cache = model.make_cache()
    model(mx.array(tokens(9)), cache)
    moe_layers, k = len(stream.pools), model.args.num_experts_per_tok
    assert stats.syncs == moe_layers and stats.tokens == 9 and stats.pairs == 9 * k * moe_layers
    disk_bytes = next(iter(stream.pools.values())).expert_bytes
    for _ in range(5):
        before = (stats.picks, stats.syncs)
        model(mx.array([[7]]), cache)
        assert stats.picks - before[0] == k * moe_layers  # one token: its top_k distinct experts per layer
        assert stats.syncs - before[1] == moe_layers      # one synchronization per MoE layer
    assert stats.hits + stats.misses == stats.picks
    assert stats.bytes_read == stats.misses * disk_bytes == stream.reader.bytes_read
    assert 0 < stats.hit_rate < 1 and stats.tokens == 14
    stats.reset()
    assert stats.picks == stats.bytes_read == 0


def test_pool_rounds_and_lru():
    stats = ExpertStats()
    pool = ExpertPool(8, 3, expert_bytes=10, stats=stats)
    (r,) = pool.plan(np.array([[0, 1], [1, 2]]))
    assert sorted(e for e, _ in r.loads) == [0, 1, 2] and (stats.picks, stats.misses, stats.pairs) == (3, 3, 4)
    (r,) = pool.plan(np.array([[0, 3]]))  # 1 and 2 are the least recently used: 3 replaces one of them
    assert len(r.loads) == 1 and pool.slot_of[0] >= 0 and pool.slot_of[3] >= 0
    assert pool.slot_of[1] < 0 or pool.slot_of[2] < 0
    rounds = pool.plan(np.array([[4, 5, 6, 7, 0]]))  # 5 experts, 3 slots: the hit first, each loaded once
    assert 0 in rounds[0].experts and sum(len(r.experts) for r in rounds) == 5
    assert sorted(e for r in rounds for e, _ in r.loads) == [4, 5, 6, 7]
    for r in rounds:
        assert all(r.slot_of[e] >= 0 for e in r.experts) and len(set(r.slot_of[r.experts])) == len(r.experts)
    assert stats.hits + stats.misses == stats.picks and stats.bytes_read == 10 * stats.misses


def test_pool_lfu_keeps_busy_experts_and_pins_stay():
    stats = ExpertStats()
    lfu = ExpertPool(6, 2, 1, stats, policy="lfu")
    for _ in range(4):
        lfu.plan(np.array([[0]]))
    lfu.plan(np.array([[1]]))
    lfu.plan(np.array([[2]]))  # LRU would evict 0 (older); LFU evicts 1 (fewer picks)
    assert lfu.slot_of[0] >= 0 and lfu.slot_of[1] < 0
    pinned = ExpertPool(6, 3, 1, stats, pinned=[5])
    pinned.plan(np.array([[5]]))
    for e in range(5):
        pinned.plan(np.array([[e]]))
    assert pinned.slot_of[5] >= 0
    rounds = pinned.plan(np.array([[0, 1, 2, 3]]))  # the idle pinned slot leaves 2 per round
    assert [len(r.experts) for r in rounds] == [2, 2] and pinned.slot_of[5] >= 0
    with pytest.raises(ValueError, match="policy"):
        ExpertPool(4, 2, 1, stats, policy="fifo")


def test_mtp_and_generation_on_tinyseek():
    resident, _ = load(TINYSEEK, mtp=True)
    model, tokenizer = load(TINYSEEK, mtp=True, expert_memory_gb=budget_for(resident, 6))
    ids = mx.array(np.load(TINYSEEK / "validation" / "val_ids.npy")[None, 500:540])
    h_a, h_b = resident.hidden(ids), model.hidden(ids)
    assert mx.array_equal(h_a, h_b).item()
    assert mx.array_equal(resident.draft_logits(h_a[:, :-1], ids[:, 1:]), model.draft_logits(h_b[:, :-1], ids[:, 1:])).item()
    prompt = ids[0, :16].tolist()
    plain = [r.token for r in stream_generate(resident, tokenizer, prompt, 12)]
    for mtp in (False, True):
        assert [r.token for r in stream_generate(model, tokenizer, prompt, 12, mtp=mtp, prefill_step_size=5)] == plain


def test_a_budget_that_holds_every_expert_loads_them(quantized_v3):
    model = load_model(quantized_v3, expert_memory_gb=100.0)
    assert not hasattr(model, "expert_stream")
    assert isinstance(model.layers[1].mlp.switch_mlp, RoutedExperts)


def test_warning_when_a_token_does_not_fit(quantized_v3):
    resident = load_model(quantized_v3)
    with pytest.warns(UserWarning, match="fewer than the 3 one token uses"):
        load_model(quantized_v3, expert_memory_gb=budget_for(resident, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(quantized_v3, expert_memory_gb=budget_for(resident, 3))


def test_bad_arguments(checkpoint, quantized_v3):
    with pytest.raises(ValueError, match="positive"):
        load_model(quantized_v3, expert_memory_gb=0)
    with pytest.raises(CheckpointError, match="converted"):
        load_model(checkpoint("v3"), quantize=4, expert_memory_gb=0.001)


@pytest.mark.parametrize("change", ["truncate", "rewrite", "remove"])
def test_a_shard_changed_under_the_model_is_a_clear_error(change, quantized_v3, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(quantized_v3, folder)
    resident = load_model(folder)
    model = load_model(folder, expert_memory_gb=budget_for(resident, 4))
    shard = folder / "model.safetensors"
    model(mx.array(tokens(4)))  # reads fine
    if change == "truncate":
        os.truncate(shard, shard.stat().st_size - 1000)
    elif change == "rewrite":
        data = shard.read_bytes()
        shard.write_bytes(data)  # same bytes, same size, a new mtime: a rewritten file
        st = shard.stat()
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    else:
        shard.rename(folder / "moved.safetensors")
    with pytest.raises(ExpertFileChanged, match="model.safetensors"):
        model(mx.array(tokens(20, seed=3)))


def test_chat_flag_reports_expert_reads(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import chat

    assert chat.main(["--model", str(TINYSEEK), "--expert-memory", "0.01", "--prompt", "import os",
                      "--max-tokens", "6", "--temp", "0"]) == 0
    out = capsys.readouterr().out
    assert "hits" in out and "GB read per token" in out and "syncs per token" in out


def test_the_benchmark_runs_at_toy_size(tmp_path, monkeypatch):
    import json

    from bench import experts_on_disk

    monkeypatch.setenv("MLX_DEEPSEEK_BENCH_RESULTS", str(tmp_path))
    assert experts_on_disk.main(["--toy"]) == 0
    result = json.loads((tmp_path / "experts_on_disk.json").read_text())
    full = [r for r in result["replay"] if r["slots"] == 16]
    assert all(r["hit_rate"] > 0.9 for r in full) and all(0 < r["hit_rate"] < 1 for r in result["replay"])
    assert all(r["syncs_per_token"] == 3 for r in result["timed"])
    assert {r["mac"] for r in result["projection"]} and result["read_path"]


def test_a_cache_saved_by_the_resident_model_loads_in_the_streamed_one(quantized_v3, tmp_path):
    from mlx_deepseek.generate import PromptCache, model_fingerprint

    resident, model = streamed(quantized_v3, 4)
    assert model_fingerprint(model) == model_fingerprint(resident)
    saved = PromptCache(resident)
    saved(list(range(3, 15)))
    saved.save(tmp_path / "c.safetensors")
    restored = PromptCache(model)
    restored.load(tmp_path / "c.safetensors")
    token = mx.array([[7]])
    assert mx.array_equal(resident(token, saved.cache), model(token, restored.cache)).item()


def test_mixed_precision_experts_are_refused_clearly(checkpoint, tmp_path):
    import json

    counts = {"model.layers.1.mlp.switch_mlp": [900, 800, 700, 600, 500, 400, 300, 200, 100, 90, 80, 70, 60, 50, 0, 0],
              "model.layers.2.mlp.switch_mlp": [100] * 16}
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps({"format": "mlx-deepseek expert usage v1", "counts": counts}))
    src = checkpoint("v3", q_lora_rank=64, qk_nope_head_dim=32, v_head_dim=32)
    out = tmp_path / "mixed"
    assert convert_main(["--hf-path", str(src), "--mlx-path", str(out), "-q", "--q-group-size", "32",
                         "--expert-usage", str(usage), "--expert-bits", "2,3,4", "--target-bits", "5.0"]) == 0
    with pytest.raises(CheckpointError, match="mixed bit widths"):
        load_model(out, expert_memory_gb=0.0001)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_shards_are_closed_when_the_model_goes(quantized_v3):
    import gc

    resident = load_model(quantized_v3)
    budget = budget_for(resident, 4)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        model = load_model(quantized_v3, expert_memory_gb=budget)
        model(mx.array(tokens(3)))
        del model
        gc.collect()
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_server_streams_experts_and_reports_them():
    """`--expert-memory` on the server (its batched decoding included): the greedy replies of
    resident experts, and /health says what was read."""
    import threading

    import httpx2 as httpx
    from server_helpers import r1_tiny, running_server

    from mlx_deepseek.generate import generate

    folder = r1_tiny()
    model, tokenizer = load(folder)
    prompts = [list(range(3, 3 + n)) for n in (5, 9, 14)]
    expected = [generate(model, tokenizer, p, 8, temp=0.0) for p in prompts]
    with running_server(folder, "--expert-memory", str(budget_for(model, 4))) as url:
        replies = [None] * len(prompts)

        def ask(i):
            body = {"prompt": prompts[i], "max_tokens": 8, "temperature": 0}
            replies[i] = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        health = httpx.get(url + "/health").json()
    assert replies == expected
    assert 0 < health["experts"]["hit_rate"] < 1 and health["experts"]["bytes_read"] > 0
