"""DeepSeek-V3.2 (sparse attention) against transformers' DeepseekV32ForCausalLM on the same weights.

The fixture's index_topk is 16, so contexts of hundreds of tokens are far past the boundary; YaRN's
original context is 32 tokens. Indexer weights are set so that top-k has no ties (checkpoints.tie_free_indexer),
and `test_reference_top_k_has_no_ties` checks that on the reference side.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import SHARED, reference_logits, rel_err, tokens

from mlx_deepseek import load_model
from mlx_deepseek.models import args_from_config
from mlx_deepseek.models.cache import LatentCache, QuantizedLatentCache, latent_bytes_per_token
from mlx_deepseek.models.config import ConfigError, ModelArgs


@pytest.fixture(scope="module")
def folder(checkpoint):
    return checkpoint("v32")


@pytest.fixture(scope="module")
def long_reference(folder, reference):
    toks = tokens(640, seed=1)
    return toks, reference_logits(reference(folder), toks)


def test_published_config_loads():
    config = json.loads((SHARED / "configs" / "DeepSeek-V3.2.json").read_text())
    args = args_from_config(config)
    assert (args.index_n_heads, args.index_head_dim, args.index_topk) == (64, 128, 2048)
    assert args.sparse and args.family == "deepseek_v3" and args.topk_method == "noaux_tc"
    # 512 latent + 64 RoPE key + 128 indexer key values per token and layer
    assert latent_bytes_per_token(args, mx.bfloat16) == (512 + 64 + 128) * 2
    assert latent_bytes_per_token(args, mx.bfloat16, bits=8) == 512 + 2 * 8 * 2 + 64 * 2 + 128 * 2


def test_config_needs_the_indexer_fields():
    config = json.loads((SHARED / "configs" / "DeepSeek-V3.2.json").read_text())
    del config["index_topk"]
    with pytest.raises(ConfigError, match="index_topk"):
        ModelArgs.from_dict(config)
    config.update(index_topk=2048, index_head_dim=32)
    with pytest.raises(ConfigError, match="index_head_dim"):
        ModelArgs.from_dict(config)
    v3 = json.loads((SHARED / "configs" / "DeepSeek-V3.json").read_text())
    assert not ModelArgs.from_dict({**v3, "index_topk": 2048}).sparse  # only deepseek_v32 is sparse


def test_reference_top_k_has_no_ties(folder, reference):
    """On the reference's own scores: the 16th and 17th best keys of every row differ clearly."""
    toks = tokens(640, seed=1)
    scores = []
    original = torch.Tensor.topk

    def capture(self, k, *args, **kwargs):
        if self.ndim == 3 and self.shape[-1] == 640:
            scores.append(self[0].numpy().copy())
        return original(self, k, *args, **kwargs)

    torch.Tensor.topk = capture
    try:
        reference_logits(reference(folder), toks)
    finally:
        torch.Tensor.topk = original
    assert len(scores) == 3
    for s in scores:
        for t in range(16, 640):
            best = np.sort(s[t, : t + 1])[::-1]
            assert best[15] - best[16] > 1e-6 * np.abs(best).max(), t


def test_long_prefill_matches_transformers(folder, long_reference):
    toks, ref = long_reference
    ours = np.array(load_model(folder)(mx.array(toks)))
    assert rel_err(ours, ref) < 1e-4


def test_cached_decode_far_past_the_boundary(folder, long_reference):
    """A dense-size prompt (12 tokens), then one token at a time up to 640: crosses index_topk and
    runs 40x past it; YaRN's original context (32) is passed 20 times."""
    toks, ref = long_reference
    model = load_model(folder)
    cache = model.make_cache()
    out = [np.array(model(mx.array(toks[:, :12]), cache=cache))]
    for i in range(12, 640):
        out.append(np.array(model(mx.array(toks[:, i : i + 1]), cache=cache)))
    assert rel_err(np.concatenate(out, axis=1), ref) < 1e-4
    assert cache[0].offset == 640


@pytest.mark.parametrize("chunks", [[10, 13, 300, 317], [16, 1, 1, 622], [600, 40]])
def test_chunked_prefill_straddling_the_boundary(folder, long_reference, chunks):
    toks, ref = long_reference
    model = load_model(folder)
    cache = model.make_cache()
    out, at = [], 0
    for n in chunks:
        out.append(np.array(model(mx.array(toks[:, at : at + n]), cache=cache)))
        at += n
    assert rel_err(np.concatenate(out, axis=1), ref) < 1e-4


def test_greedy_continuation_matches_transformers_generate(folder, reference):
    """A 40-token prompt (past the boundary) and 64 greedy tokens, transformers' generate vs ours."""
    prompt = tokens(40, seed=2)
    with torch.no_grad():
        expected = reference(folder).generate(
            torch.tensor(prompt), max_new_tokens=64, do_sample=False, min_new_tokens=64
        )[0, 40:].tolist()
    model = load_model(folder)
    cache = model.make_cache()
    logits = model(mx.array(prompt), cache=cache)
    got = []
    for _ in range(64):
        got.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[got[-1]]]), cache=cache)
    assert got == expected


def test_decode_reads_at_most_index_topk_rows(folder, monkeypatch):
    """Decode at 600 cached tokens: the indexer chooses 16 rows per layer and attention gets just those."""
    from mlx_deepseek.models import sparse

    model = load_model(folder)
    cache = model.make_cache()
    model(mx.array(tokens(600, seed=4)), cache=cache)
    gathered = []
    original = sparse.gather_rows
    monkeypatch.setattr(sparse, "gather_rows", lambda a, c: gathered.append(original(a, c)) or gathered[-1])
    model(mx.array([[5]]), cache=cache)
    assert gathered and all(g.shape[:3] == (1, 1, 16) for g in gathered)


def test_indexer_rope_layout_matters(folder, long_reference, monkeypatch):
    """mlx-lm #1431: the indexer rotating interleaved pairs (MLA's layout) instead of halves. The
    same weights with the layouts swapped select other tokens past the boundary: logits depart."""
    from mlx_deepseek.models.indexer import Indexer

    toks, ref = long_reference
    model = load_model(folder)
    for layer in model.layers:
        layer.self_attn.indexer.rope.interleaved = True
    swapped = np.array(model(mx.array(toks)))
    assert rel_err(swapped[:, :16], ref[:, :16]) < 1e-4  # dense below the boundary: the same
    assert rel_err(swapped, ref) > 1e-2
    assert isinstance(model.layers[0].self_attn.indexer, Indexer)


def test_cache_holds_indexer_keys_trims_and_counts_bytes(folder, long_reference):
    toks, ref = long_reference
    model = load_model(folder)
    args = model.args
    cache = model.make_cache()
    model(mx.array(toks[:, :300]), cache=cache)
    c = cache[0]
    assert len(c.state) == 3 and c.state[2].shape == (1, 1, 300, args.index_head_dim)
    assert c.nbytes == c.capacity * latent_bytes_per_token(args, mx.float32)
    # rewind 50 tokens and take another path back to 640: still the reference
    for layer_cache in cache:
        assert layer_cache.trim(50) == 50
    out = np.array(model(mx.array(toks[:, 250:640]), cache=cache))
    assert rel_err(out, ref[:, 250:640]) < 1e-4


class RoundedLatentCache(LatentCache):
    """A plain cache of the latents a quantized cache would hold (quantized, then dequantized)."""

    def __init__(self, bits):
        super().__init__()
        self.bits = bits

    def update_and_fetch(self, latent, rope_key, *index_key):
        rounded = mx.dequantize(*mx.quantize(latent, 32, self.bits), group_size=32, bits=self.bits)
        return super().update_and_fetch(rounded, rope_key, *index_key)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_latent_cache(folder, bits):
    """--kv-bits on V3.2: the latents quantized (the indexer keys stay in the model dtype, float32
    here), a prefill chunk and decode past the boundary: the same numbers as plain attention on the
    latents those bits hold (the selection then is the same too). Against the unquantized reference
    the rounding moves scores enough to flip near-tied choices of this random fixture."""
    toks = tokens(520, seed=1)
    model = load_model(folder)
    cache = model.make_cache(kv_bits=bits, kv_group_size=32)
    rounded = [RoundedLatentCache(bits) for _ in model.layers]
    assert isinstance(cache[0], QuantizedLatentCache)
    out, ref = [], []
    for start, end in [(0, 500)] + [(i, i + 1) for i in range(500, 520)]:
        out.append(np.array(model(mx.array(toks[:, start:end]), cache=cache)))
        ref.append(np.array(model(mx.array(toks[:, start:end]), cache=rounded)))
    assert len(cache[0].state) == 5 and cache[0].state[4].dtype == mx.float32
    assert cache[0].nbytes == cache[0].capacity * latent_bytes_per_token(model.args, mx.float32, bits=bits,
                                                                         group_size=32)
    assert rel_err(np.concatenate(out, axis=1), np.concatenate(ref, axis=1)) < 1e-4


def published_fp8(name):
    """What DeepSeek-V3.2's FP8 checkpoint stores in FP8: V3's projections and the indexer's query and
    key projections; `weights_proj` and the key norm stay in high precision."""
    return (("proj" in name and "weights_proj" not in name) or name.endswith(("indexer.wq_b.weight",
                                                                             "indexer.wk.weight"))) \
        and "gate.weight" not in name


def test_fp8_checkpoint_with_the_indexer_converts_and_loads(folder, tmp_path):
    from test_convert import convert, hf_logits, make_fp8, ours

    dequantized = make_fp8(folder, tmp_path / "fp8", fp8=published_fp8)
    assert "model.layers.1.self_attn.indexer.wq_b.weight" in dequantized
    assert "model.layers.1.self_attn.indexer.weights_proj.weight" not in dequantized
    toks = tokens(600, seed=5)
    expected = hf_logits(folder, toks, dequantized)
    assert convert(tmp_path / "fp8", tmp_path / "out", "--dtype", "float32") == 0
    assert rel_err(ours(tmp_path / "out", toks), expected) < 1e-4
    assert rel_err(ours(tmp_path / "fp8", toks, dtype=mx.float32), expected) < 1e-4  # FP8 loads directly too


def test_quantized_conversion_keeps_the_indexer_head_weights_and_norm(checkpoint, tmp_path):
    from test_convert import ALIGNED, convert, dequantized_reference_state, hf_logits, ours

    src = checkpoint("v32", **ALIGNED)
    assert convert(src, tmp_path / "out", "-q", "--q-group-size", "32") == 0
    w = mx.load(str(tmp_path / "out/model.safetensors"))
    indexer = "model.layers.1.self_attn.indexer"
    assert f"{indexer}.wq_b.scales" in w and f"{indexer}.wk.scales" in w  # the `indexer` kind: -q bits
    assert f"{indexer}.weights_proj.scales" not in w and w[f"{indexer}.weights_proj.weight"].dtype == mx.float32
    assert w[f"{indexer}.k_norm.bias"].dtype == mx.float32
    state = dequantized_reference_state(src, "deepseek_v3", 4, 32, ALIGNED)
    state = {k: v for k, v in state.items() if "weights_proj" not in k}
    toks = tokens(300, seed=6)
    assert rel_err(ours(tmp_path / "out", toks), hf_logits(src, toks, state)) < 1e-4


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_cache_file_saves_and_loads_the_indexer_keys(folder, long_reference, tmp_path, kv_bits):
    """PromptCache.save / load (generate.py's cache files) past the boundary: the loaded cache goes on
    exactly as the one that was saved, and a file whose indexer keys are missing is refused."""
    from mlx_deepseek.generate import CacheFileError, PromptCache, cache_checksum, read_cache_file

    toks, _ = long_reference
    model = load_model(folder)
    saved = PromptCache(model, kv_bits, 32)
    saved(toks[0, :300].tolist())
    saved.save(tmp_path / "c.safetensors")
    loaded = PromptCache(model, kv_bits, 32)
    loaded.load(tmp_path / "c.safetensors")
    assert len(loaded.cache[0].state) == len(saved.cache[0].state) == (3 if kv_bits is None else 5)
    a, b = saved(toks[0, 300:340].tolist()), loaded(toks[0, 300:340].tolist())
    assert np.array_equal(np.array(a), np.array(b))
    # the same file without the indexer keys (as a V3 cache would be) does not fit this model
    arrays = dict(mx.load(str(tmp_path / "c.safetensors")))
    last = len(saved.cache[0].state) - 1
    arrays = {k: v for k, v in arrays.items() if not k.endswith(f".{last}")}
    _, meta = read_cache_file(tmp_path / "c.safetensors")
    meta = {k: v for k, v in meta.items() if k != "checksum"}
    meta["checksum"] = cache_checksum(arrays, meta)
    mx.save_safetensors(str(tmp_path / "d.safetensors"), arrays, metadata=meta)
    with pytest.raises(CacheFileError, match="not this model's latent cache"):
        PromptCache(model, kv_bits, 32).load(tmp_path / "d.safetensors")


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_batched_decode_of_sequences_either_side_of_the_boundary(folder, kv_bits):
    """The server's batch cache: a 10-token and a 300-token sequence decode together (right-padded),
    each exactly as on its own."""
    from mlx_deepseek.models.cache import BatchLatentCache

    model = load_model(folder)
    prompts = [tokens(10, seed=7), tokens(300, seed=8)]
    steps = tokens(6, seed=9, batch=2)
    alone = []
    for b, p in enumerate(prompts):
        cache = model.make_cache(kv_bits, 32)
        model(mx.array(p), cache=cache)
        alone.append(np.concatenate([np.array(model(mx.array(steps[b : b + 1, i : i + 1]), cache=cache))
                                     for i in range(6)], axis=1))
    fresh = []
    for b, p in enumerate(prompts):
        cache = model.make_cache(kv_bits, 32)
        model(mx.array(p), cache=cache)
        fresh.append(cache)
    batch = [BatchLatentCache.from_caches([fresh[0][i], fresh[1][i]]) for i in range(len(model.layers))]
    together = np.concatenate([np.array(model(mx.array(steps[:, i : i + 1]), cache=batch)) for i in range(6)], axis=1)
    assert rel_err(together[0], alone[0][0]) < 1e-4 and rel_err(together[1], alone[1][0]) < 1e-4
    back = batch[0].extract(1)
    assert len(back.state) == len(fresh[1][0].state) and back.offset == 306


def hf_mtp_logits(reference_folder, mtp_folder, ids):
    """The MTP layer by hand around transformers' own V3.2 decoder layer (the 4th layer of the
    reference folder is the MTP block): lm_head(norm(block(eh_proj([enorm(e_{i+1}); hnorm(h_i)])))),
    h_i the main model's final (post-norm) hidden state."""
    import transformers
    from safetensors.torch import load_file

    hf = transformers.AutoModelForCausalLM.from_pretrained(reference_folder, dtype=torch.float32).eval()
    w = load_file(str(mtp_folder / "model.safetensors"))
    eps = hf.config.rms_norm_eps

    def rms(x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w[f"model.layers.3.{name}.weight"]

    t = torch.tensor(ids)
    with torch.no_grad():
        hf.config.num_hidden_layers = 3  # the main model: layers 0..2 and the final norm
        h = hf.model(input_ids=t).last_hidden_state
        x = torch.cat([rms(hf.model.embed_tokens(t[:, 1:]), "enorm"), rms(h[:, :-1], "hnorm")], dim=-1)
        x = x @ w["model.layers.3.eh_proj.weight"].T
        L = x.shape[1]
        positions = torch.arange(L)[None]
        mask = torch.full((L, L), torch.finfo(torch.float32).min).triu(1)[None, None]
        x = hf.model.layers[3](x, attention_mask=mask, position_embeddings=hf.model.rotary_emb(x, positions),
                               position_ids=positions, cache=None)
        x = x[0] if isinstance(x, tuple) else x
        return hf.lm_head(rms(x, "shared_head.norm")).numpy()


def test_mtp_layer_with_its_indexer():
    """The MTP block is a V3.2 layer with an indexer of its own: past the boundary in one pass, and
    through its own draft cache one token at a time."""
    from checkpoints import build_v32_mtp

    folder, reference_folder = build_v32_mtp()
    ids = tokens(300, seed=10)
    expected = hf_mtp_logits(reference_folder, folder, ids)
    model = load_model(folder, mtp=True)
    assert "indexer" in model.mtp.block.self_attn
    assert not any("embed" in k or "lm_head" in k for k in dict(__import__("mlx.utils").utils.tree_flatten(
        model.mtp.parameters())))  # the stored copies equal the main ones: shared
    h = model.hidden(mx.array(ids))
    assert rel_err(np.array(model.draft_logits(h[:, :-1], mx.array(ids[:, 1:]))), expected) < 1e-4
    draft = model.make_draft_cache()
    steps = [np.array(model.draft_logits(h[:, :40], mx.array(ids[:, 1:41]), draft))]
    steps += [np.array(model.draft_logits(h[:, i : i + 1], mx.array(ids[:, i + 1 : i + 2]), draft)) for i in range(40, 299)]
    assert rel_err(np.concatenate(steps, axis=1), expected) < 1e-4
    model.mtp.block.self_attn.indexer.topk = 10**6  # dense attention in the MTP block: not what V3.2 computes
    assert rel_err(np.array(model.draft_logits(h[:, :-1], mx.array(ids[:, 1:]))), expected) > 1e-2


def test_pipeline_two_ranks_equal_one_process(checkpoint, tmp_path):
    """V3.2's layers are ordinary decoder layers: split over 2 ranks (loopback ring) as V3's are; the
    conversation runs past index_topk (37-token prompt, two turns)."""
    from mlx_deepseek import load
    from test_pipeline import PROMPT, launch, two_turns

    folder = checkpoint("v32", num_hidden_layers=4)
    r0 = launch(folder, tmp_path / "r", port=5530)
    model, tokenizer = load(folder)
    assert rel_err(np.array(r0["logits"]), np.array(model(mx.array([PROMPT])))) < 1e-5
    assert [r0["first"], r0["second"]] == list(two_turns(model, tokenizer))


def test_self_speculative_decoding_changes_nothing_greedy():
    """MTP drafts (its indexer on its own draft cache, rewound on rejections): greedy tokens as without."""
    from checkpoints import build_v32_mtp

    from mlx_deepseek import load
    from mlx_deepseek.generate import stream_generate

    folder, _ = build_v32_mtp()
    model, tokenizer = load(folder, mtp=True)
    prompt = tokens(30, seed=11)[0].tolist()
    plain = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=48)]
    drafted = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=48, mtp=True)]
    assert drafted == plain


@pytest.mark.parametrize("quantize", [False, True])
def test_mlx_lm_folders_load(checkpoint, reference, tmp_path, quantize):
    """mlx_lm.convert's deepseek_v32 folders (indexer tensors under the same names, per-head
    embed_q / unembed_out): unquantized equal to transformers past the boundary, quantized equal to
    mlx-lm's own run of the folder."""
    import mlx_lm
    from mlx_lm import convert
    from test_convert import ALIGNED

    src = checkpoint("v32", **ALIGNED)
    convert(str(src), str(tmp_path / "out"), quantize=quantize, q_group_size=32, q_bits=4)
    toks = tokens(300, seed=13)
    ours = np.array(load_model(tmp_path / "out")(mx.array(toks)))
    if quantize:
        theirs, _ = mlx_lm.load(str(tmp_path / "out"))
        assert rel_err(ours, np.array(theirs(mx.array(toks)))) < 1e-4
    else:
        assert rel_err(ours, reference_logits(reference(src), toks)) < 1e-4
