"""DeepSeek-V4 against transformers' DeepseekV4ForCausalLM on the same weights (float32).

Fixtures (tests/checkpoints.py `build_v4`): every layer kind in one model (sliding only, CSA with
overlapping windows and a top-k indexer, HCA), hash-routed and scored MoE layers, a small
`index_topk` so the indexer's choice matters, 128-token windows (Flash's pattern) and short ones.
Ties: the indexer picks by sum_h w_h ReLU(q_h . k); with 16 indexer heads an exact tie at 0 needs
all 16 ReLUs at zero for two entries at once, which these fixtures never hit (the tests would show
it as a mismatch), so no tie-break rule is imposed on either side.
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_v4
from conftest import SHARED

from mlx_deepseek import ConfigError, load, load_model
from mlx_deepseek.generate import PromptCache, prefill, stream_generate
from mlx_deepseek.models.deepseek_v4 import Model, V4Args
from mlx_deepseek.models.deepseek_v4.cache import v4_values_per_token

DATA = Path(__file__).resolve().parent / "data"
LENGTHS = {"v4_small": 300, "v4_flash": 640, "v4_pro": 300}


@pytest.fixture(scope="module")
def hf():
    import transformers

    models = {}

    def get(variant):
        if variant not in models:
            models[variant] = transformers.DeepseekV4ForCausalLM.from_pretrained(
                build_v4(variant, "hf"), dtype=torch.float32).eval()
        return models[variant]

    return get


def tokens(variant, n=None, seed=0):
    return np.random.RandomState(seed).randint(0, 160, (1, n or LENGTHS[variant]))


def ref_logits(model, toks):
    with torch.no_grad():
        return model(torch.tensor(toks)).logits.float().numpy()


def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("variant", ["v4_small", "v4_flash", "v4_pro"])
@pytest.mark.parametrize("layout", ["hf", "native"])
def test_logits_equal_transformers(hf, variant, layout):
    toks = tokens(variant)
    model = load_model(build_v4(variant, layout))
    assert rel(model(mx.array(toks)), ref_logits(hf(variant), toks)) < 1e-4


@pytest.mark.parametrize("variant,chunks", [
    ("v4_small", [5, 7, 1, 1, 1, 30, 2, 64, 1, 100, 1]),           # boundaries inside windows and entries
    ("v4_flash", [100, 27, 1, 1, 128, 3, 255, 1, 1, 60, 63]),       # across 128-token windows
])
def test_chunked_prefill_and_decode_equal_one_pass(hf, variant, chunks):
    toks = tokens(variant, sum(chunks), seed=1)
    model = load_model(build_v4(variant, "hf"))
    cache, out, at = model.make_cache(), [], 0
    for n in chunks:
        out.append(np.array(model(mx.array(toks[:, at : at + n]), cache)))
        at += n
    assert rel(np.concatenate(out, axis=1), ref_logits(hf(variant), toks)) < 1e-4
    assert all(c.offset == at for c in cache)


def test_greedy_continuation_equals_transformers_generate(hf):
    variant = "v4_small"
    prompt = tokens(variant, 150, seed=2)
    with torch.no_grad():
        ref = hf(variant).generate(torch.tensor(prompt), max_new_tokens=40, do_sample=False)[0, 150:].tolist()
    model, tokenizer = load(build_v4(variant, "hf"))
    tokenizer._eos_token_ids = set()  # random weights: do not stop early
    ours = [r.token for r in stream_generate(model, tokenizer, prompt[0].tolist(), max_tokens=40,
                                             prefill_step_size=64)]
    assert ours == ref


@pytest.mark.parametrize("position", [3, 16, 31, 77, 128, 129, 200, 255, 298])
def test_rewind_to_any_position_equals_fresh_prefill(position):
    """A cache that held 300 tokens, rewound to `position` and continued with other tokens, gives
    the logits of a fresh prefill of the new sequence (snapshots + re-prefill)."""
    model = load_model(build_v4("v4_small", "hf"))
    first = tokens("v4_small", 300, seed=3)[0].tolist()
    second = first[:position] + tokens("v4_small", 40, seed=4)[0].tolist()
    pc = PromptCache(model)
    prefill(pc, first[:240], chunk_size=60)  # a prefill in chunks, then decode steps (as `decode` runs them)
    for t in first[240:]:
        pc.hidden(mx.array([t]))
        pc.checkpoint(None)
        pc.tokens.append(t)
    reused = pc.reuse(second, chunk_size=50)
    assert reused == position and pc.tokens == second[:position]
    assert pc.reprefilled <= 60  # from the latest snapshot at or before `position`, not from 0
    got = np.array(pc.model.logits(pc.hidden(second[position:])))
    fresh = np.array(model(mx.array([second])))[:, position:]
    assert rel(got, fresh) < 1e-5


@pytest.mark.parametrize("kept", [12, 5, 0])
def test_second_turn_reuses_the_cache_and_equals_a_fresh_run(kept):
    """The next turn keeps the whole reply (kept=12), or drops part of it (as templates drop past
    reasoning): the cache rewinds inside the reply, and the turn equals a fresh run."""
    model, tokenizer = load(build_v4("v4_small", "hf"))
    tokenizer._eos_token_ids = set()
    turn1 = tokens("v4_small", 90, seed=5)[0].tolist()
    pc = PromptCache(model)
    reply = [r.token for r in stream_generate(model, tokenizer, turn1, max_tokens=12, prompt_cache=pc)]
    turn2 = turn1 + reply[:kept] + tokens("v4_small", 20, seed=6)[0].tolist()
    rs = list(stream_generate(model, tokenizer, turn2, max_tokens=10, prompt_cache=pc))
    assert rs[-1].stats.reused_tokens == len(turn1) + kept
    assert rs[-1].stats.reprefilled_tokens == (0 if kept == 12 else kept)  # from the snapshot after turn 1's prompt
    fresh = [r.token for r in stream_generate(model, tokenizer, turn2, max_tokens=10)]
    assert [r.token for r in rs] == fresh


def test_cache_file_round_trip(tmp_path):
    model = load_model(build_v4("v4_small", "hf"))
    toks = tokens("v4_small", 150, seed=7)[0].tolist()
    pc = PromptCache(model)
    pc.hidden(toks[:137])
    pc.save(tmp_path / "c.safetensors")
    other = PromptCache(model)
    other.load(tmp_path / "c.safetensors")
    assert other.tokens == toks[:137]
    a = np.array(pc.model.logits(pc.hidden(toks[137:])))
    b = np.array(other.model.logits(other.hidden(toks[137:])))
    assert np.array_equal(a, b)


def test_cache_bytes_per_token():
    flash = V4Args.from_dict(json.loads((SHARED / "configs" / "DeepSeek-V4-Flash.json").read_text()))
    assert v4_values_per_token(flash) == 3440  # 21 CSA layers x (512 + 128) / 4 + 20 HCA layers x 512 / 128
    model = load_model(build_v4("v4_small", "hf"))
    cache = model.make_cache()
    n = 400
    model(mx.array(tokens("v4_small", n, seed=8)), cache)
    entries = sum(s.count * s.width for c in cache for s in (c.compressor, c.indexer) if s is not None)
    args = model.args
    assert entries == sum((n // r) * (args.head_dim + (args.index_head_dim if r == 4 else 0))
                          for r in args.compress_ratios[: args.num_hidden_layers] if r)
    per_token = v4_values_per_token(args)
    assert per_token == 32 // 4 + 16 // 4 + 32 // 16 + 32 // 4 + 16 // 4


def test_parameter_counts_of_published_configs():
    """Flash: 284B without the MTP block (as DeepSeek counts V3's 671B); Pro: 1.6T with it."""
    from mlx.utils import tree_flatten

    def count(config, mtp):
        model = Model(V4Args.from_dict(config), mtp=mtp)  # lazy: nothing is allocated
        return sum(v.size for k, v in tree_flatten(model.parameters()) if not k.endswith("tid2eid"))

    flash = json.loads((SHARED / "configs" / "DeepSeek-V4-Flash.json").read_text())
    pro = json.loads((DATA / "DeepSeek-V4-Pro.json").read_text())
    assert count(flash, False) == 284_332_240_471  # "284B"
    assert count(flash, True) == 290_942_289_362
    assert count(pro, False) == 1_572_997_201_763
    assert count(pro, True) == 1_598_837_347_742  # "1.6T"


def test_bad_configs_are_clear_errors():
    base = json.loads((SHARED / "configs" / "DeepSeek-V4-Flash.json").read_text())
    with pytest.raises(ConfigError, match="compress_ratios has 5 entries"):
        V4Args.from_dict({**base, "compress_ratios": [0, 4, 128, 4, 0]})
    with pytest.raises(ConfigError, match="o_groups"):
        V4Args.from_dict({**base, "o_groups": 7})
    with pytest.raises(ConfigError, match="missing required"):
        V4Args.from_dict({k: v for k, v in base.items() if k != "head_dim"})


def test_context_beyond_max_position_embeddings_is_a_clear_error():
    model = load_model(build_v4("v4_small", "hf"))
    model.args.max_position_embeddings = 64
    with pytest.raises(ValueError, match="exceed the model's context"):
        model(mx.array(tokens("v4_small", 65)))


def test_a_step_interrupted_half_way_is_settled_exactly():
    """Ctrl-C in the middle of a forward pass leaves some layers a step ahead: settle() goes back to
    a snapshot and forward, and the next tokens equal a fresh run."""
    model = load_model(build_v4("v4_small", "hf"))
    toks = tokens("v4_small", 120, seed=9)[0].tolist()
    pc = PromptCache(model)
    prefill(pc, toks[:100], chunk_size=40)
    # the next step ran through the first two layers only, then was interrupted
    h = model.embed(mx.array([toks[100:101]]))
    h = mx.broadcast_to(h[:, :, None], (1, 1, model.args.hc_mult, h.shape[-1]))
    for layer, c in zip(model.layers[:2], pc.cache[:2]):
        h = layer(h, mx.array([toks[100:101]]), c)
    assert pc.cache[0].offset == 101 and pc.cache[3].offset == 100
    pc.settle()
    assert all(c.offset == 100 and c.consistent() for c in pc.cache) and len(pc.tokens) == 100
    got = np.array(model.logits(pc.hidden(toks[100:])))
    assert rel(got, np.array(model(mx.array([toks])))[:, 100:]) < 1e-5


def test_a_cache_file_of_another_shape_is_refused(tmp_path):
    from mlx_deepseek.generate import CacheFileError, cache_checksum

    model = load_model(build_v4("v4_small", "hf"))
    pc = PromptCache(model)
    pc.hidden(tokens("v4_small", 50, seed=10)[0].tolist())
    pc.save(tmp_path / "good.safetensors")
    # one compressed entry fewer than 50 tokens leave, in a file with a valid checksum
    arrays, meta = mx.load(str(tmp_path / "good.safetensors"), return_metadata=True)
    arrays["layer.1.1"] = arrays["layer.1.1"][:, :-1]
    meta["checksum"] = cache_checksum(arrays, meta)
    mx.save_safetensors(str(tmp_path / "bad.safetensors"), arrays, metadata=meta)
    fresh = PromptCache(model)
    with pytest.raises(CacheFileError, match="layer.1 does not fit this model"):
        fresh.load(tmp_path / "bad.safetensors")
    assert fresh.tokens == [] and all(c.offset == 0 for c in fresh.cache)
