"""DeepSeek-V4's MTP block and self-speculative decoding on V4's snapshot-rewound cache.

transformers has no V4 MTP: the block is checked against DeepSeek's MTPBlock math written with
transformers' own V4 modules (its decoder layer as the block's layer, its hyper head and norm):
    x = e_proj(enorm(embed(t_{i+1}))) + h_proj(hnorm(streams_i)),  logits = head(norm(hc_head(layer(x))))
where `streams` are the main model's residual streams before its hyper head.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_v4, hf_v4_config, v4_settings

from mlx_deepseek import load, load_model
from mlx_deepseek.generate import PromptCache, stream_generate


def rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def v4():
    model, tokenizer = load(build_v4("v4_mtp", "native"), mtp=True)
    tokenizer._eos_token_ids = set()  # random weights: never stop early
    return model, tokenizer


def _reference_mtp(folder, tokens):
    """DeepSeek's MTPBlock on transformers' modules: (1, L-1, vocab) logits for t_{i+2}."""
    import transformers
    from safetensors.numpy import load_file

    s = v4_settings("v4_mtp")
    main = transformers.DeepseekV4ForCausalLM.from_pretrained(build_v4("v4_mtp", "hf"), dtype=torch.float32).eval()
    captured = {}
    main.model.hc_head.register_forward_hook(lambda m, args, out: captured.setdefault("streams", args[0]))
    with torch.no_grad():
        main(torch.tensor(tokens))
    streams = captured["streams"][:, :-1]  # (1, L-1, N, D): the pairs (streams_i, t_{i+1})
    nxt = torch.tensor(tokens[:, 1:])

    # the block: a one-layer transformers model whose layer is sliding-window, non-hash
    one = hf_v4_config({**s, "num_hidden_layers": 1, "compress_ratios": [0], "num_hash_layers": 0})
    block = transformers.DeepseekV4ForCausalLM(one).eval()
    w = {k: torch.tensor(v) for k, v in load_file(str(folder / "model.safetensors")).items()}
    rename = {"attn.wq_a": "self_attn.q_a_proj", "attn.q_norm": "self_attn.q_a_norm", "attn.wq_b": "self_attn.q_b_proj",
              "attn.wkv": "self_attn.kv_proj", "attn.kv_norm": "self_attn.kv_norm", "attn.wo_a": "self_attn.o_a_proj",
              "attn.wo_b": "self_attn.o_b_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "ffn.gate": "mlp.gate", "ffn.shared_experts.w1": "mlp.shared_experts.gate_proj",
              "ffn.shared_experts.w3": "mlp.shared_experts.up_proj", "ffn.shared_experts.w2": "mlp.shared_experts.down_proj"}
    layer = block.model.layers[0]
    with torch.no_grad():
        layer.self_attn.sinks.copy_(w["mtp.0.attn.attn_sink"])
        for kind in ("attn", "ffn"):
            hc = getattr(layer, f"{kind}_hc")
            for part in ("fn", "base", "scale"):
                getattr(hc, part).copy_(w[f"mtp.0.hc_{kind}_{part}"])
        for ours, theirs in rename.items():
            for leaf in ("weight", "bias"):
                if f"mtp.0.{ours}.{leaf}" in w:
                    name = f"{theirs}.{leaf}" if not (theirs == "mlp.gate" and leaf == "bias") else "mlp.gate.e_score_correction_bias"
                    layer.get_submodule(name.rsplit(".", 1)[0]).get_parameter(name.rsplit(".", 1)[1]).copy_(
                        w[f"mtp.0.{ours}.{leaf}"]) if leaf == "weight" else layer.mlp.gate.e_score_correction_bias.copy_(
                        w[f"mtp.0.{ours}.{leaf}"])
        E = s["n_routed_experts"]
        layer.mlp.experts.gate_up_proj.copy_(torch.stack([torch.cat([w[f"mtp.0.ffn.experts.{e}.w1.weight"],
                                                                      w[f"mtp.0.ffn.experts.{e}.w3.weight"]]) for e in range(E)]))
        layer.mlp.experts.down_proj.copy_(torch.stack([w[f"mtp.0.ffn.experts.{e}.w2.weight"] for e in range(E)]))
        hh = block.model.hc_head
        hh.hc_fn.copy_(w["mtp.0.hc_head_fn"]), hh.hc_base.copy_(w["mtp.0.hc_head_base"]), hh.hc_scale.copy_(w["mtp.0.hc_head_scale"])
        block.model.norm.weight.copy_(w["mtp.0.norm.weight"])

        rms = lambda x, g: g * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # noqa: E731
        e = rms(main.model.embed_tokens(nxt), w["mtp.0.enorm.weight"]) @ w["mtp.0.e_proj.weight"].T
        h = rms(streams, w["mtp.0.hnorm.weight"]) @ w["mtp.0.h_proj.weight"].T
        x = e[:, :, None] + h
        L = x.shape[1]
        pos = torch.arange(L)[None]
        i, j = torch.arange(L)[:, None], torch.arange(L)[None]
        mask = torch.where((j <= i) & (j > i - s["sliding_window"]), 0.0, float("-inf"))[None, None]
        pe = {"main": block.model.rotary_emb(x, pos, layer_type="main"),
              "compress": block.model.rotary_emb(x, pos, layer_type="compress")}
        y = layer(x, position_embeddings=pe, position_ids=pos, attention_mask=mask, input_ids=nxt)
        return main.lm_head(block.model.norm(block.model.hc_head(y))).numpy()


def test_mtp_block_equals_deepseeks_math_on_transformers_modules(v4):
    model, _ = v4
    folder = build_v4("v4_mtp", "native")
    toks = np.random.RandomState(0).randint(0, 160, (1, 120))
    ref = _reference_mtp(folder, toks)
    streams = model.hidden(mx.array(toks))
    ours = model.draft_logits(streams[:, :-1], mx.array(toks[:, 1:]), model.make_draft_cache())
    assert rel(ours, ref) < 1e-4


def test_greedy_with_mtp_is_token_for_token_plain_greedy(v4):
    model, tokenizer = v4
    total_accepted = total_drafted = 0
    for seed in range(3):
        prompt = np.random.RandomState(10 + seed).randint(0, 160, 70).tolist()
        plain = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=60, prefill_step_size=32)]
        rs = list(stream_generate(model, tokenizer, prompt, max_tokens=60, mtp=True, prefill_step_size=32))
        assert [r.token for r in rs] == plain
        total_accepted += rs[-1].stats.accepted
        total_drafted += rs[-1].stats.drafted
    assert 0 < total_accepted < total_drafted  # both paths taken: accepted drafts and rewound rejections


def test_caches_after_rejections_equal_a_fresh_prefill(v4):
    model, tokenizer = v4
    pc = PromptCache(model)
    prompt = np.random.RandomState(20).randint(0, 160, 50).tolist()
    rs = list(stream_generate(model, tokenizer, prompt, max_tokens=40, prompt_cache=pc, mtp=True))
    assert rs[-1].stats.accepted < rs[-1].stats.drafted
    nxt = np.random.RandomState(21).randint(0, 160, 9).tolist()
    got = np.array(model.logits(pc.hidden(nxt)))
    fresh = np.array(model(mx.array([pc.tokens])))[:, -len(nxt):]
    assert rel(got, fresh) < 1e-5


def test_second_turn_with_mtp_equals_a_fresh_run(v4):
    model, tokenizer = v4
    pc = PromptCache(model)
    first = np.random.RandomState(30).randint(0, 160, 40).tolist()
    reply = [r.token for r in stream_generate(model, tokenizer, first, max_tokens=20, prompt_cache=pc, mtp=True)]
    second = first + reply + np.random.RandomState(31).randint(0, 160, 15).tolist()
    turn = list(stream_generate(model, tokenizer, second, max_tokens=25, prompt_cache=pc, mtp=True))
    # the last reply token was yielded, never fed; the reply is run again from the settled snapshot
    # after turn 1's prompt (with a draft cache, only those have the draft's pairs in step)
    assert turn[-1].stats.reused_tokens == len(first) + len(reply) - 1
    assert turn[-1].stats.reprefilled_tokens == len(reply) - 1
    assert [r.token for r in turn] == [r.token for r in stream_generate(model, tokenizer, second, max_tokens=25)]


def test_a_v4_checkpoint_without_mtp_says_so():
    from mlx_deepseek import CheckpointError

    with pytest.raises(CheckpointError, match="no multi-token-prediction block"):
        load_model(build_v4("v4_mtp", "hf"), mtp=True)


def test_native_config_is_read_as_published():
    config = json.loads((build_v4("v4_mtp", "native") / "config.json").read_text())
    assert config["compress_ratios"] == [0, 4, 128, 4, 0] and "layer_types" not in config
