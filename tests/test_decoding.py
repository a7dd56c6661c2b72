"""Incremental decoding through the latent cache equals one full forward pass."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import SHARED, rel_err, tokens

from mlx_deepseek import ModelArgs, load_model
from mlx_deepseek.models.mla import MLA
from mlx_deepseek.models import moe


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint("v3"))


def run_chunks(model, toks, sizes, cache=None):
    cache = cache if cache is not None else model.make_cache()
    out, start = [], 0
    for size in sizes:
        out.append(np.array(model(mx.array(toks[:, start : start + size]), cache=cache)))
        start += size
    return np.concatenate(out, axis=1), cache


def test_prefill_then_decode_equals_full_forward(model):
    toks = tokens(40, seed=4)
    full = np.array(model(mx.array(toks)))
    incremental, cache = run_chunks(model, toks, [30] + [1] * 10)
    assert rel_err(incremental, full) < 1e-5
    assert all(c.offset == 40 for c in cache)


def test_chunked_prefill_equals_one_prefill(model):
    toks = tokens(300, seed=5)  # crosses the cache's 256-token growth step
    one, _ = run_chunks(model, toks, [300])
    chunked, _ = run_chunks(model, toks, [64, 64, 100, 7, 65])
    assert rel_err(chunked, one) < 1e-5


def test_trim_then_redecode_equals_never_going_there(model):
    toks = tokens(30, seed=6)
    detour = tokens(9, seed=7)
    straight, _ = run_chunks(model, toks, [20, 10])
    _, cache = run_chunks(model, np.concatenate([toks[:, :20], detour], axis=1), [20, 5, 4])
    assert all(c.trim(9) == 9 for c in cache)
    resumed, _ = run_chunks(model, toks[:, 20:], [10], cache=cache)
    assert rel_err(resumed, straight[:, 20:]) < 1e-5


@pytest.mark.parametrize("chunk", [1, 5, 200])
def test_absorbed_and_decompressed_paths_agree(model, monkeypatch, chunk):
    """Both ways of evaluating attention on a cache give the same logits, whatever the chunk length."""
    toks = tokens(200 + chunk, seed=8)
    results = {}
    for absorb in (True, False):
        monkeypatch.setattr(MLA, "absorbs", lambda self, L, T, a=absorb: a)
        results[absorb], _ = run_chunks(model, toks, [200, chunk])
    assert rel_err(results[True], results[False]) < 1e-5


def test_cost_rule_absorbs_for_decode_and_short_chunks_on_long_caches():
    """V3 shapes: decoding and small chunks on a long cache absorb; a fresh long prompt decompresses."""
    config = json.loads((SHARED / "configs/DeepSeek-V3.json").read_text())
    mla = MLA(ModelArgs.from_dict(config))  # lazily initialized: nothing is allocated
    assert mla.absorbs(1, 2) and mla.absorbs(1, 100_000)
    assert mla.absorbs(64, 4096 + 64)      # a short chat turn on a long cache
    assert not mla.absorbs(2048, 2048)     # a fresh long prompt
    assert not mla.absorbs(512, 16384 + 512)  # a long chunk: decompressing is cheaper per token


def test_sorted_expert_dispatch_equals_unsorted(model, monkeypatch):
    toks = tokens(40, seed=9)
    unsorted = np.array(model(mx.array(toks)))  # 40 tokens x 3 experts = 120 pairs: sorted by default
    monkeypatch.setattr(moe, "SORT_THRESHOLD", 10**9)
    assert rel_err(np.array(model(mx.array(toks))), unsorted) < 1e-6


def test_batch_rows_are_independent(model):
    toks = tokens(24, seed=10, batch=3)
    batched = np.array(model(mx.array(toks)))
    for b in range(3):
        assert rel_err(batched[b : b + 1], np.array(model(mx.array(toks[b : b + 1])))) < 1e-5
