"""The latent cache holds (kv_lora_rank + qk_rope_head_dim) values per token and layer, nothing more."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import SHARED, rel_err, tokens

from mlx_deepseek import LatentCache, ModelArgs, latent_bytes_per_token, load_model


def real_args(name):
    return ModelArgs.from_dict(json.loads((SHARED / "configs" / name).read_text()))


@pytest.mark.parametrize("name,per_token", [("DeepSeek-V2-Lite.json", 576 * 2), ("DeepSeek-V3.json", 576 * 2),
                                            ("Kimi-K2-Instruct.json", 576 * 2)])
def test_bytes_per_token_of_real_configs(name, per_token):
    assert latent_bytes_per_token(real_args(name), mx.bfloat16) == per_token


def test_v2_lite_cache_is_8_9x_smaller_than_full_per_head_kv():
    """mlx-lm caches K (heads x (nope + rope)) and V (heads x v) per token for deepseek_v2."""
    a = real_args("DeepSeek-V2-Lite.json")
    full = a.num_attention_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * 2
    assert full / latent_bytes_per_token(a, mx.bfloat16) == pytest.approx(8.89, abs=0.01)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_memory_is_exactly_the_latent_per_token(checkpoint, dtype):
    model = load_model(checkpoint("v2_lite"), dtype=dtype)
    args = model.args
    per_token = latent_bytes_per_token(args, dtype)
    assert per_token == (32 + 16) * dtype.size
    cache = model.make_cache()
    model(mx.array(tokens(LatentCache.step)), cache=cache)  # exactly one growth step
    for c in cache:
        assert c.offset == c.capacity == 256
        assert c.nbytes == 256 * per_token
        latent, rope_key = c.state
        assert latent.shape == (1, 1, 256, args.kv_lora_rank) and rope_key.shape == (1, 1, 256, args.qk_rope_head_dim)
        assert latent.dtype == rope_key.dtype == dtype


def test_grows_in_steps_and_writes_in_place():
    cache = LatentCache()
    for i in range(300):
        cache.update_and_fetch(mx.full((1, 1, 1, 8), i, mx.float32), mx.full((1, 1, 1, 2), -i, mx.float32))
        assert cache.capacity == (256 if i < 256 else 512)
    latent, rope_key = cache.state
    assert np.array(latent[0, 0, :, 0]).tolist() == list(range(300))
    assert np.array(rope_key[0, 0, :, 1]).tolist() == [-i for i in range(300)]


def test_state_round_trip_continues_identically(checkpoint):
    model = load_model(checkpoint("v3"))
    toks = tokens(26, seed=11)
    cache = model.make_cache()
    model(mx.array(toks[:, :20]), cache=cache)
    restored = model.make_cache()
    for src, dst in zip(cache, restored):
        dst.state = [mx.array(np.array(a)) for a in src.state]  # through host memory, as a file would
        dst.meta_state = src.meta_state
    a = np.array(model(mx.array(toks[:, 20:]), cache=cache))
    b = np.array(model(mx.array(toks[:, 20:]), cache=restored))
    assert rel_err(b, a) == 0.0


def test_trim_protocol():
    cache = LatentCache()
    assert cache.is_trimmable() and cache.empty() and cache.nbytes == 0 and cache.state == []
    cache.update_and_fetch(mx.zeros((1, 1, 10, 4)), mx.zeros((1, 1, 10, 2)))
    assert cache.trim(3) == 3 and cache.offset == 7
    assert cache.trim(100) == 7 and cache.offset == 0
    assert cache.state[0].shape == (1, 1, 0, 4)


def test_mlx_lm_generation_utilities_run_on_our_model_and_cache(checkpoint):
    """mlx-lm's stream_generate and prompt-cache helpers drive our model and LatentCache unchanged."""
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

    from mlx_deepseek import load

    model, tokenizer = load(checkpoint("v3"))
    prompt = tokenizer.encode("the cache")
    cache = make_prompt_cache(model)
    assert all(isinstance(c, LatentCache) for c in cache)
    theirs = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=12, prompt_cache=cache)]

    ours, own_cache = [], model.make_cache()
    logits = model(mx.array([prompt]), cache=own_cache)
    for _ in range(12):
        ours.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[ours[-1]]]), cache=own_cache)
    assert theirs == ours
    assert can_trim_prompt_cache(cache) and trim_prompt_cache(cache, 4) == 4
    assert cache[0].offset == len(prompt) + 12 - 4  # mlx-lm runs one step ahead
