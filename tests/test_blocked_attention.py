"""The decompressed MLA path expands the cached latents block by block with an online softmax:
equal to one pass for every block size, with causality and the batch key mask, in bounded memory."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_deepseek import ModelArgs
from mlx_deepseek.models.mla import MLA

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, q_lora_rank=None)


def mla(**overrides) -> MLA:
    mx.random.seed(0)
    layer = MLA(ModelArgs.from_dict({"model_type": "deepseek_v3", **SHAPE, **overrides}))
    mx.eval(layer.parameters())
    return layer


def inputs(layer: MLA, B: int, L: int, T: int, seed: int):
    mx.random.seed(seed)
    H = layer.heads
    return (mx.random.normal((B, H, L, layer.nope)), mx.random.normal((B, H, L, layer.rope_dim)),
            mx.random.normal((B, 1, T, layer.rank)), mx.random.normal((B, 1, T, layer.rope_dim)))


def key_mask(B: int, T: int) -> mx.array:
    """Right-padded rows of different lengths, as the server's batched cache masks them."""
    lengths = mx.array([T - 13 * b for b in range(B)])
    return mx.arange(T)[None] < lengths[:, None]


@pytest.mark.parametrize("L", [1, 7])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("block", [16, 37, 64, 100])  # 100 = 1 block; 37 leaves a partial last block
def test_blocked_equals_one_pass(L, masked, block):
    layer = mla()
    B, T = 2, 100
    q_nope, q_pe, latent, k_pe = inputs(layer, B, L, T, seed=block + L)
    keys = key_mask(B, T) if masked else None
    one = layer._attend_decompressed(q_nope, q_pe, latent, k_pe, keys, block=T)
    blocked = layer._attend_decompressed(q_nope, q_pe, latent, k_pe, keys, block=block)
    np.testing.assert_allclose(np.array(blocked), np.array(one), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("L", [1, 7])
@pytest.mark.parametrize("masked", [False, True])
def test_decompressed_equals_absorbed(L, masked):
    """The same attention evaluated on the latents (the RoPE term as an additive mask) and expanded."""
    layer = mla()
    B, T = 2, 90
    q_nope, q_pe, latent, k_pe = inputs(layer, B, L, T, seed=3)
    keys = key_mask(B, T) if masked else None
    absorbed = layer._attend_absorbed(q_nope, q_pe, latent, k_pe, keys)  # already through value_up
    blocked = layer._attend_decompressed(q_nope, q_pe, latent, k_pe, keys, block=32)
    np.testing.assert_allclose(np.array(blocked), np.array(absorbed), rtol=1e-4, atol=1e-5)


def test_block_respects_the_memory_budget():
    layer = mla(num_attention_heads=128, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512)
    for L in (1, 32, 256, 512, 2048):
        block = layer.block_tokens(1, L, 4)
        per_token = 128 * ((128 + 64 + 128) * 4 + 4 * L)
        assert block % 256 == 0 and (block * per_token <= layer.DECOMPRESS_BUDGET or block == 256)


def test_peak_memory_is_one_block_not_the_history():
    """Expanding 4,096 cached tokens x 8 heads at once holds ~10 MB; in 256-token blocks, under 5 MB (measured 3.8)."""
    layer = mla(num_attention_heads=8, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    q_nope, q_pe, latent, k_pe = inputs(layer, 1, 4, 4096, seed=5)
    mx.eval(q_nope, q_pe, latent, k_pe)
    peaks = {}
    for block in (4096, 256):
        mx.synchronize()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(layer._attend_decompressed(q_nope, q_pe, latent, k_pe, None, block=block))
        peaks[block] = (mx.get_peak_memory() - base) / 2**20
    assert peaks[4096] > 10 and peaks[256] < 5, peaks


def test_model_with_blocked_decompression_equals_absorbed(checkpoint, monkeypatch):
    """The whole model on a cache: a 100-token chunk on 300 cached tokens, decompressed in 256-token
    blocks (a partial last block, causal), equals the absorbed path."""
    from conftest import rel_err, tokens

    from mlx_deepseek import load_model

    model = load_model(checkpoint("v3"))
    toks = tokens(400, seed=11)
    monkeypatch.setattr(MLA, "DECOMPRESS_BUDGET", 1)  # the 256-token minimum block
    results = {}
    for absorb in (True, False):
        monkeypatch.setattr(MLA, "absorbs", lambda self, L, T, a=absorb: a)
        cache = model.make_cache()
        model(mx.array(toks[:, :300]), cache=cache)
        results[absorb] = np.array(model(mx.array(toks[:, 300:]), cache=cache))
    assert rel_err(results[False], results[True]) < 1e-5


@pytest.mark.parametrize("mode,bits,group", [("affine", 4, 32), ("affine", 8, 64), ("mxfp4", 4, 32)])
def test_quantized_expansion_is_the_dequantized_matrix(mode, bits, group):
    """The decompressed path expands with key_up/value_up dequantized once (a dense matmul): the
    same map as the quantized matmul, so a quantized layer's decompressed attention equals its
    absorbed one (which keeps the quantized matmuls)."""
    import mlx.nn as nn

    from mlx_deepseek.models.mla import QuantizedHeadProjection

    layer = mla(kv_lora_rank=64)
    nn.quantize(layer, group_size=group, bits=bits, mode=mode,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group == 0)
    assert isinstance(layer.key_up, QuantizedHeadProjection) and isinstance(layer.value_up, QuantizedHeadProjection)
    x = mx.random.normal((2, layer.heads, 5, layer.rank))
    for projection in (layer.key_up, layer.value_up):
        np.testing.assert_allclose(np.array(x @ projection.dense()), np.array(projection(x)), rtol=1e-4, atol=1e-4)
    q_nope, q_pe, latent, k_pe = inputs(layer, 2, 7, 90, seed=4)
    absorbed = layer._attend_absorbed(q_nope, q_pe, latent, k_pe, key_mask(2, 90))
    blocked = layer._attend_decompressed(q_nope, q_pe, latent, k_pe, key_mask(2, 90), block=32)
    np.testing.assert_allclose(np.array(blocked), np.array(absorbed), rtol=1e-4, atol=1e-4)
