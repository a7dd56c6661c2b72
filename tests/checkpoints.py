"""Tiny random DeepSeek checkpoints written by Hugging Face transformers' own model classes.

Each variant mirrors a real config's code paths at toy size. Built once and cached under
`.fixtures/` (git-ignored), keyed by the variant's settings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / ".fixtures"

YARN = {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

BASE = dict(
    vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=16,
    qk_nope_head_dim=24, v_head_dim=20, n_shared_experts=1, num_experts_per_tok=3,
    first_k_dense_replace=1, max_position_embeddings=4096, initializer_range=0.08,
    rope_theta=10000.0, rope_scaling=YARN, tie_word_embeddings=False,
)

VARIANTS = {
    # V2-Lite: no q_lora, softmax greedy, a first dense layer, YaRN with mscale 0.707
    "v2_lite": dict(model_type="deepseek_v2", q_lora_rank=None, n_routed_experts=8, topk_method="greedy",
                    n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                    rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # V2 / V2.5: q_lora, group-limited greedy, a routed scaling factor
    "v2": dict(model_type="deepseek_v2", q_lora_rank=48, n_routed_experts=16, topk_method="group_limited_greedy",
               n_group=4, topk_group=2, routed_scaling_factor=16.0, norm_topk_prob=False),
    # V3 / R1: sigmoid noaux_tc with a non-zero correction bias, groups, renormalized weights
    "v3": dict(model_type="deepseek_v3", q_lora_rank=48, n_routed_experts=16, topk_method="noaux_tc",
               scoring_func="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True),
    # Kimi-K2 shape: one group, beta_fast == beta_slow (zero-width YaRN ramp), transformers-5 config keys
    "kimi": dict(model_type="deepseek_v3", q_lora_rank=48, n_routed_experts=12, topk_method="noaux_tc",
                 scoring_func="sigmoid", n_group=1, topk_group=1, routed_scaling_factor=2.827, norm_topk_prob=True,
                 rope_theta=50000.0, rope_scaling={**YARN, "beta_fast": 1.0, "beta_slow": 1.0, "factor": 4.0},
                 keep_rope_parameters=True),
    # plain RoPE (rope_scaling null) and tied embeddings, as some fine-tunes ship
    "v3_plain": dict(model_type="deepseek_v3", q_lora_rank=48, n_routed_experts=8, n_group=1, topk_group=1,
                     routed_scaling_factor=1.0, norm_topk_prob=True, rope_scaling=None, tie_word_embeddings=True),
}


def settings(variant: str, **overrides) -> dict:
    return {**BASE, **VARIANTS[variant], **overrides}


def build(variant: str, dtype: str = "float32", **overrides) -> Path:
    """Path to the checkpoint folder of `variant` (saved in `dtype`), building it if needed."""
    s = settings(variant, **overrides)
    key = hashlib.sha1(json.dumps([s, dtype], sort_keys=True).encode()).hexdigest()[:10]
    folder = ROOT / f"{variant}-{dtype}-{key}"
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _write(s, dtype, tmp)
    tmp.rename(folder)
    return folder


def _write(s: dict, dtype: str, folder: Path) -> None:
    import torch
    import transformers

    s = dict(s)
    keep_rope_parameters = s.pop("keep_rope_parameters", False)
    family = s["model_type"]
    cls_cfg = transformers.DeepseekV2Config if family == "deepseek_v2" else transformers.DeepseekV3Config
    cls_model = transformers.DeepseekV2ForCausalLM if family == "deepseek_v2" else transformers.DeepseekV3ForCausalLM
    published = {k: s[k] for k in ("rope_theta", "rope_scaling")}
    cfg = cls_cfg(**{k: v for k, v in s.items() if k != "model_type"})
    torch.manual_seed(0)
    model = cls_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # norms are initialized to ones; make them matter
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    if not keep_rope_parameters:
        # DeepSeek's published configs say rope_theta / rope_scaling; transformers 5 writes rope_parameters.
        config = json.loads((folder / "config.json").read_text())
        config.pop("rope_parameters", None)
        config.update(published)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, s["vocab_size"])


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly vocab_size tokens, so mlx-lm can load the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    printable = ["\u0120", "\u010a"] + [chr(c) for c in range(33, 127)]  # space, newline, ASCII
    rest = sorted(set(pre_tokenizers.ByteLevel.alphabet()) - set(printable))
    vocab = {"<|bos|>": 0, "<|eos|>": 1}
    for ch in (printable + rest)[: vocab_size - 2]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
         "chat_template": CHAT_TEMPLATE}))


# DeepSeek-V2-Chat's template shape, with the tiny tokenizer's special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}Assistant: {{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}\n\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
