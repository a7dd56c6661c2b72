"""Multi-token prediction: the MTP module against transformers, and self-speculative decoding that
changes nothing but the speed (greedy: same tokens; sampling: same distribution)."""

import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import SHARED, rel_err

from mlx_deepseek import CheckpointError, load, load_model
from mlx_deepseek.generate import DraftPolicy, PromptCache, stream_generate

TINYSEEK = SHARED / "models" / "tinyseek-py"
VAL = np.load(TINYSEEK / "validation" / "val_ids.npy")


@pytest.fixture(scope="module")
def tinyseek():
    return load(TINYSEEK, mtp=True)


def mtp_logits(model, ids):
    h = model.model(mx.array(ids))
    return np.array(model.draft_logits(h[:, :-1], mx.array(ids[:, 1:])))


def test_mtp_logits_match_transformers(tinyseek):
    import torch
    from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    ids = VAL[None, 1000:1130].astype(np.int64)
    saved = DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected
    DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected = [r"model\.layers\.4\..*"]
    try:
        hf = AutoModelForCausalLM.from_pretrained(TINYSEEK, dtype=torch.float32).eval()
        mtp = MtpModel.from_pretrained(hf).eval()
    finally:
        DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected = saved
    t = torch.tensor(ids)
    with torch.no_grad():
        h = hf.model(input_ids=t).last_hidden_state
        x = mtp.forward_layer(0, h[:, :-1], torch.arange(1, t.shape[1])[None], None, input_ids=t[:, 1:])
        expected = mtp._project_to_logits(x).numpy()
    assert rel_err(mtp_logits(tinyseek[0], ids), expected) < 1e-4


def test_mtp_shares_the_main_embedding_and_head(tinyseek):
    model = tinyseek[0]
    names = {k for k, _ in __import__("mlx.utils", fromlist=["tree_flatten"]).tree_flatten(model.mtp.parameters())}
    assert not any("embed" in n or "head." in n for n in names)


def test_converted_folders_keep_the_mtp_layer(tinyseek, tmp_path):
    from convert.cli import main as convert

    assert convert(["--hf-path", str(TINYSEEK), "--mlx-path", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    ids = VAL[None, :64]
    assert rel_err(mtp_logits(load_model(tmp_path / "f32", mtp=True), ids), mtp_logits(tinyseek[0], ids)) < 1e-5
    assert convert(["--hf-path", str(TINYSEEK), "--mlx-path", str(tmp_path / "q4"), "-q", "--q-group-size", "32"]) == 0
    quantized = load_model(tmp_path / "q4", mtp=True)
    assert "scales" in quantized.mtp.block.mlp.switch_mlp.gate_proj
    agree = (mtp_logits(quantized, ids).argmax(-1) == mtp_logits(tinyseek[0], ids).argmax(-1)).mean()
    assert agree > 0.8


def test_a_checkpoint_without_mtp_says_so(checkpoint):
    with pytest.raises(CheckpointError, match="no multi-token-prediction layer"):
        load_model(checkpoint("v3"), mtp=True)
    model, tokenizer = load(checkpoint("v3"))
    with pytest.raises(ValueError, match="without its MTP module"):
        list(stream_generate(model, tokenizer, "x", mtp=True))


@pytest.mark.parametrize("which", ["head", "embedding", "both"])
def test_differing_mtp_copies_are_used_as_stored(which, tinyseek, tmp_path):
    """A fine-tune that trained the MTP layer's embedding / head apart: the stored ones are used."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(TINYSEEK, folder)
    weights = load_file(folder / "model.safetensors")
    rng = np.random.default_rng(0)
    for part, name in (("head", "shared_head.head"), ("embedding", "embed_tokens")):
        if which in (part, "both"):
            w = weights[f"model.layers.4.{name}.weight"]
            weights[f"model.layers.4.{name}.weight"] = w + (0.05 * rng.standard_normal(w.shape)).astype(w.dtype)
    save_file(weights, folder / "model.safetensors")
    model = load_model(folder, mtp=True)
    assert ("lm_head" in model.mtp) == (which != "embedding") and ("embed_tokens" in model.mtp) == (which != "head")

    # the math: the (verified) shared model's MTP block fed the stored embedding, read out by the stored head
    base, ids = tinyseek[0], VAL[None, :40]
    E, H = weights["model.layers.4.embed_tokens.weight"], weights["model.layers.4.shared_head.head.weight"]
    h = base.model(mx.array(ids))
    x = np.array(base.mtp(h[:, :-1], mx.array(E[ids[:, 1:]])))
    assert rel_err(mtp_logits(model, ids), x @ H.T) < 1e-5
    assert np.array_equal(np.array(model(mx.array(ids))), np.array(base(mx.array(ids))))


def test_greedy_with_mtp_is_token_for_token_plain_greedy(tinyseek):
    model, tokenizer = tinyseek
    accepted = drafted = 0
    for start in (0, 5000, 90000):
        prompt = VAL[start : start + 48].tolist()
        plain = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=160)]
        responses = list(stream_generate(model, tokenizer, prompt, max_tokens=160, mtp=True))
        assert [r.token for r in responses] == plain
        stats = responses[-1].stats
        assert stats.main_steps < 160 and stats.main_steps == stats.drafted
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert accepted / drafted > 0.5  # a trained MTP head: 0.78 over 16 validation prompts


def test_caches_after_rejections_equal_caches_that_never_saw_them(tinyseek):
    model, tokenizer = tinyseek
    pc = PromptCache(model)
    prompt = VAL[85099 : 85099 + 64].tolist()  # a prompt where the draft is often wrong
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=60, prompt_cache=pc, mtp=True))
    assert responses[-1].stats.accepted < responses[-1].stats.drafted  # there were rejections
    fresh = PromptCache(model)
    fresh.hidden(pc.tokens)
    for a, b in zip(pc.cache, fresh.cache):
        assert a.offset == b.offset == len(pc.tokens)
        assert rel_err(np.array(a.state[0]), np.array(b.state[0])) < 1e-4
    # the draft cache holds exactly the pairs (h_i, t_{i+1}) of those tokens
    n = pc.draft_cache.offset
    h = model.model(mx.array([pc.tokens]))
    recomputed = PromptCache(model)
    recomputed.draft(h[:, :n], pc.tokens[1 : n + 1])
    assert rel_err(np.array(pc.draft_cache.state[0]), np.array(recomputed.draft_cache.state[0])) < 1e-4


def test_second_turn_with_mtp_reuses_the_cache_and_continues_identically(tinyseek):
    model, tokenizer = tinyseek
    pc = PromptCache(model)
    first = VAL[:30].tolist()
    reply = [r.token for r in stream_generate(model, tokenizer, first, max_tokens=20, prompt_cache=pc, mtp=True)]
    second = first + reply + VAL[200:220].tolist()
    turn = list(stream_generate(model, tokenizer, second, max_tokens=30, prompt_cache=pc, mtp=True))
    assert turn[-1].stats.reused_tokens >= len(first) + len(reply) - 2
    assert [r.token for r in turn] == [r.token for r in stream_generate(model, tokenizer, second, max_tokens=30)]


def test_speculative_sampling_keeps_the_target_distribution():
    """Drafts drawn from q, checked against p: the emitted tokens are distributed as p (chi-square)."""
    mx.random.seed(0)
    target = mx.array([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5]])
    draft = mx.array([[0.0, 2.0, 0.0, 1.0, 0.5, -1.0]])
    policy = DraftPolicy(temp=1.0)
    p = np.array(policy.probs(target)[0])
    n, counts = 4000, np.zeros(6)
    for _ in range(n):
        d = policy.sample(draft)
        instead = policy.verify(target, draft, d)
        counts[d if instead is None else instead] += 1
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 20.5  # p = 0.001 for 5 degrees of freedom


def test_filtered_distributions():
    policy = DraftPolicy(temp=1.0, top_k=2)
    assert np.count_nonzero(np.array(policy.probs(mx.array([[3.0, 2.0, 1.0, 0.0]])))) == 2
    p = np.array(DraftPolicy(temp=1.0, top_p=0.7).probs(mx.array([[np.log(0.5), np.log(0.3), np.log(0.2)]])))[0]
    assert np.allclose(p, [0.5 / 0.8, 0.3 / 0.8, 0.0], atol=1e-6)
