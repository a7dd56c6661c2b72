"""The quantized latent cache: exact in size, equal to attention on its dequantized latents, close to
the plain cache, and trimmed / saved / loaded like it."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import SHARED, rel_err

from mlx_deepseek import ModelArgs, latent_bytes_per_token, load
from mlx_deepseek.models.cache import QuantizedLatentCache
from mlx_deepseek.generate import PromptCache, stream_generate
from mlx_deepseek.models.mla import MLA

TINYSEEK = SHARED / "models" / "tinyseek-py"
VAL = np.load(TINYSEEK / "validation" / "val_ids.npy")


@pytest.fixture(scope="module")
def tinyseek():
    return load(TINYSEEK)


@pytest.mark.parametrize("bits,expected", [(8, 512 + 2 * 8 * 2 + 64 * 2), (4, 256 + 2 * 8 * 2 + 64 * 2)])
def test_v3_bytes_per_token_in_bf16(bits, expected):
    args = ModelArgs.from_dict(json.loads((SHARED / "configs/DeepSeek-V3.json").read_text()))
    assert latent_bytes_per_token(args, mx.bfloat16, bits, 64) == expected  # 672 / 416 against 1152


@pytest.mark.parametrize("bits", [8, 4])
def test_allocated_bytes_are_exact(tinyseek, bits):
    model = tinyseek[0]
    cache = model.make_cache(kv_bits=bits, kv_group_size=32)
    model(mx.array(VAL[None, :256]), cache=cache)
    per_token = latent_bytes_per_token(model.args, mx.float32, bits, 32)
    assert per_token == 64 * bits // 8 + 2 * 2 * 4 + 32 * 4
    assert all(c.capacity == 256 and c.nbytes == 256 * per_token for c in cache)


def test_attention_on_the_quantized_latent_equals_attention_on_its_dequantized_values():
    mx.random.seed(1)
    args = ModelArgs.from_dict(json.loads((TINYSEEK / "config.json").read_text()))
    mla = MLA(args)
    cache = QuantizedLatentCache(8, 32)
    x = mx.random.normal((1, 20, args.hidden_size))
    out = mla(x, cache=cache)
    latent = mx.dequantize(*cache.state[:3], group_size=32, bits=8)
    # the same attention, written plainly on the dequantized latents
    B, L = 1, 20
    q = mla.q_b_proj(mla.q_a_layernorm(mla.q_a_proj(x))).reshape(B, L, mla.heads, -1).transpose(0, 2, 1, 3)
    q_nope, q_pe = mx.split(q, [mla.nope], axis=-1)
    q_pe = mla.rope(q_pe, 0)
    scores = (mla.key_up.t(q_nope) @ latent.swapaxes(-1, -2) + q_pe @ cache.state[3].swapaxes(-1, -2)) * mla.scale
    scores = mx.where(mx.tril(mx.ones((L, L), mx.bool_)), scores, -mx.inf)
    expected = mla.o_proj(mla.value_up(mx.softmax(scores, axis=-1) @ latent).transpose(0, 2, 1, 3).reshape(B, L, -1))
    assert rel_err(np.array(out), np.array(expected)) < 1e-5


@pytest.mark.parametrize("bits,tolerance", [(8, 0.02), (4, 0.15)])
def test_close_to_the_plain_cache(tinyseek, bits, tolerance):
    model = tinyseek[0]
    ids = mx.array(VAL[None, 3000:3200])
    plain, quantized = model.make_cache(), model.make_cache(kv_bits=bits, kv_group_size=32)
    model(ids[:, :-8], cache=plain), model(ids[:, :-8], cache=quantized)
    a = np.array(model(ids[:, -8:], cache=plain))
    b = np.array(model(ids[:, -8:], cache=quantized))
    assert rel_err(b, a) < tolerance
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.75


def test_greedy_generation_with_an_8_bit_cache(tinyseek):
    model, tokenizer = tinyseek
    prompt = VAL[9455 : 9455 + 64].tolist()
    plain = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=32)]
    quantized = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=32, kv_bits=8, kv_group_size=32)]
    assert np.mean(np.array(plain) == np.array(quantized)) > 0.8


def test_trim_save_and_load_like_the_plain_cache(tinyseek, tmp_path):
    model, tokenizer = tinyseek
    pc = PromptCache(model, kv_bits=4, kv_group_size=32)
    prompt = VAL[:50].tolist()
    list(stream_generate(model, tokenizer, prompt, max_tokens=6, prompt_cache=pc))
    assert all(c.trim(3) == 3 for c in pc.cache)
    del pc.tokens[-3:]
    pc.save(tmp_path / "q.safetensors")
    restored = PromptCache(model)  # a plain cache: the file says it was quantized
    restored.load(tmp_path / "q.safetensors")
    assert isinstance(restored.cache[0], QuantizedLatentCache) and restored.cache[0].bits == 4
    follow = pc.tokens + VAL[60:70].tolist()
    a = [r.token for r in stream_generate(model, tokenizer, follow, max_tokens=10, prompt_cache=pc)]
    b = [r.token for r in stream_generate(model, tokenizer, follow, max_tokens=10, prompt_cache=restored)]
    assert a == b
