"""Synthetic DeepSeek-shaped checkpoints in the Hugging Face layout, random bf16 weights.

The real shapes come from ../shared/configs/; `layers` and `experts` scale a model down so it
runs here. Written with the converter's own streaming writer, so building one costs no more
memory than one tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache"
CONFIGS = ROOT.parent.parent / "shared" / "configs"
sys.path.insert(0, str(ROOT.parent))

from convert.plan import Job, OutTensor, Plan  # noqa: E402
from convert.writer import atomic_folder, shard_jobs, write_shard  # noqa: E402
from mlx_deepseek.models.config import ModelArgs  # noqa: E402


TINYSEEK = ROOT.parent.parent / "shared" / "models" / "tinyseek-py"


def scaled_config(name: str, layers: int, experts: int | None = None, vocab: int | None = None,
                  dense_layers: int | None = None, overrides: dict | None = None) -> dict:
    """A real config (../shared/configs/NAME.json, or `tinyseek`) with fewer layers / experts / tokens
    (and any other fields replaced by `overrides`)."""
    file = TINYSEEK / "config.json" if name == "tinyseek" else CONFIGS / f"{name}.json"
    config = {**json.loads(file.read_text()), **(overrides or {})}
    config["num_hidden_layers"] = layers
    if vocab:
        config["vocab_size"] = vocab
    if dense_layers is not None:
        config["first_k_dense_replace"] = dense_layers
    config.pop("quantization_config", None)  # synthetic weights are bf16, not FP8
    config["num_nextn_predict_layers"] = 0
    if experts:
        config["n_routed_experts"] = experts
        config["n_group"] = min(config.get("n_group", 1), experts // max(config["num_experts_per_tok"], 2))
        config["topk_group"] = min(config.get("topk_group", 1), config["n_group"])
    return config


def hf_shapes(args: ModelArgs) -> dict[str, tuple]:
    """Tensor names and shapes of a Hugging Face DeepSeek checkpoint of this config."""
    D, H, R, r = args.hidden_size, args.num_attention_heads, args.kv_lora_rank, args.qk_rope_head_dim
    shapes = {"model.embed_tokens.weight": (args.vocab_size, D), "model.norm.weight": (D,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, D)
    for i in range(args.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)}
        a = p + "self_attn."
        if args.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (H * args.qk_head_dim, D)
        else:
            shapes |= {a + "q_a_proj.weight": (args.q_lora_rank, D), a + "q_a_layernorm.weight": (args.q_lora_rank,),
                       a + "q_b_proj.weight": (H * args.qk_head_dim, args.q_lora_rank)}
        shapes |= {a + "kv_a_proj_with_mqa.weight": (R + r, D), a + "kv_a_layernorm.weight": (R,),
                   a + "kv_b_proj.weight": (H * (args.qk_nope_head_dim + args.v_head_dim), R),
                   a + "o_proj.weight": (D, H * args.v_head_dim)}
        if args.sparse:  # V3.2's lightning indexer
            Hi, Di = args.index_n_heads, args.index_head_dim
            shapes |= {a + "indexer.wq_b.weight": (Hi * Di, args.q_lora_rank), a + "indexer.wk.weight": (Di, D),
                       a + "indexer.k_norm.weight": (Di,), a + "indexer.k_norm.bias": (Di,),
                       a + "indexer.weights_proj.weight": (Hi, D)}
        if not args.is_moe_layer(i):
            I = args.intermediate_size
            shapes |= {p + f"mlp.{n}.weight": s for n, s in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I)))}
            continue
        I, E = args.moe_intermediate_size, args.n_routed_experts
        shapes[p + "mlp.gate.weight"] = (E, D)
        if args.topk_method == "noaux_tc":
            shapes[p + "mlp.gate.e_score_correction_bias"] = (E,)
        for e in range(E):
            for n, s in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))):
                shapes[p + f"mlp.experts.{e}.{n}.weight"] = s
        S = I * args.n_shared_experts
        for n, s in (("gate_proj", (S, D)), ("up_proj", (S, D)), ("down_proj", (D, S))):
            shapes[p + f"mlp.shared_experts.{n}.weight"] = s
    return shapes


def build(name: str, layers: int, experts: int | None = None, vocab: int | None = None,
          dense_layers: int | None = None, float32: bool = False, overrides: dict | None = None) -> Path:
    """The folder of a synthetic checkpoint (cached under bench/.cache); bf16 unless `float32`
    (what runs fast on a CPU)."""
    config = scaled_config(name, layers, experts, vocab, dense_layers, overrides)
    weight_dtype = mx.float32 if float32 else mx.bfloat16
    config["torch_dtype"] = "float32" if float32 else "bfloat16"
    folder = CACHE / (f"{name}-{layers}L-{config['first_k_dense_replace']}D-{config['n_routed_experts']}E-"
                      f"{config['vocab_size']}V" + ("-f32" if float32 else "")
                      + ("-" + hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]
                         if overrides else ""))
    if (folder / "config.json").exists():
        return folder
    args = ModelArgs.from_dict(config)
    plan = Plan()
    for i, (tensor, shape) in enumerate(hf_shapes(args).items()):
        dtype = mx.float32 if tensor.endswith("e_score_correction_bias") else weight_dtype
        ones = tensor.endswith("norm.weight")

        def produce(shape=shape, dtype=dtype, ones=ones, seed=i):
            if ones:
                return iter([mx.ones(shape, dtype)])
            return iter([(0.02 * mx.random.normal(shape, key=mx.random.key(seed))).astype(dtype)])

        plan.jobs.append(Job([OutTensor(tensor, shape, dtype)], produce, 0))
    CACHE.mkdir(exist_ok=True)
    with atomic_folder(folder, force=False) as tmp:
        weight_map = {}
        shards = shard_jobs(plan, int(2e9))
        for k, jobs in enumerate(shards, start=1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            weight_map |= {t: file for t in write_shard(tmp / file, jobs)}
        (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        sys.path.insert(0, str(ROOT.parent / "tests"))
        from checkpoints import write_tokenizer

        write_tokenizer(tmp, 258)
    return folder


def results_dir() -> Path:
    """Where benchmarks write JSON and plots (MLX_DEEPSEEK_BENCH_RESULTS overrides bench/results)."""
    folder = Path(os.environ.get("MLX_DEEPSEEK_BENCH_RESULTS", ROOT / "results"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
