"""Loading: mlx-lm's converted folders, the MTP layer, and clear errors for broken checkpoints."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err, tokens

from mlx_deepseek import CheckpointError, ConfigError, load, load_model

# Dimensions that every quantization group size divides (real ones are multiples of 64).
ALIGNED = dict(q_lora_rank=64, qk_nope_head_dim=32, v_head_dim=32)


@pytest.fixture(scope="module")
def mlx_lm_folder(checkpoint, tmp_path_factory):
    """mlx_lm.convert output of a variant, quantized or not (converted once per module)."""
    from mlx_lm import convert

    made = {}

    def get(variant, quantize):
        if (variant, quantize) not in made:
            out = tmp_path_factory.mktemp("mlx") / f"{variant}-{quantize}"
            convert(str(checkpoint(variant, **ALIGNED)), str(out), quantize=quantize, q_group_size=32, q_bits=4)
            made[variant, quantize] = out
        return made[variant, quantize]

    return get


@pytest.mark.parametrize("variant,quantize", [("v2", False), ("v2", True), ("v3", False), ("v3", True)])
def test_mlx_lm_folders_give_mlx_lm_logits(mlx_lm_folder, variant, quantize):
    """v2 folders keep a (quantized) kv_b_proj; v3 folders hold the per-head embed_q / unembed_out."""
    import mlx_lm

    folder = mlx_lm_folder(variant, quantize)
    theirs, _ = mlx_lm.load(str(folder))
    ours, tokenizer = load(folder)
    toks = mx.array(tokens(40, seed=12))
    assert rel_err(np.array(ours(toks)), np.array(theirs(toks))) < 1e-4
    assert tokenizer.decode(tokenizer.encode("hello world")) .endswith("hello world")


def test_quantized_mlx_lm_folder_really_is_quantized(mlx_lm_folder):
    from mlx_deepseek.models.moe import QuantizedExpertLinear

    model = load_model(mlx_lm_folder("v2", True))
    experts = model.layers[1].mlp.switch_mlp.gate_proj
    assert isinstance(experts, QuantizedExpertLinear) and experts.bits == 4 and experts.group_size == 32
    assert "scales" in model.layers[1].self_attn.key_up  # kv_b_proj rows split, still quantized


def copy_of(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def rewrite_weights(folder, edit):
    file = folder / "model.safetensors"
    weights = dict(mx.load(str(file)))
    edit(weights)
    mx.save_safetensors(str(file), weights)


def test_mtp_layer_is_ignored(checkpoint, tmp_path):
    folder = copy_of(checkpoint("v3"), tmp_path)
    clean = np.array(load_model(folder)(mx.array(tokens(10))))
    config = json.loads((folder / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))

    def add_mtp(w):  # the MTP layer sits at index num_hidden_layers (3 here, 61 in V3)
        for k in [k for k in w if k.startswith("model.layers.2.")]:
            w[k.replace("layers.2.", "layers.3.")] = w[k]
        w["model.layers.3.eh_proj.weight"] = mx.zeros((64, 128))

    rewrite_weights(folder, add_mtp)
    assert rel_err(np.array(load_model(folder)(mx.array(tokens(10)))), clean) == 0.0


def expect_error(folder, *fragments, error=CheckpointError):
    with pytest.raises(error) as e:
        load_model(folder)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    folder = copy_of(checkpoint("v3"), tmp_path)
    rewrite_weights(folder, lambda w: w.pop("model.layers.1.self_attn.o_proj.weight"))
    expect_error(folder, "missing tensor", "model.layers.1.self_attn.o_proj.weight")


def test_missing_expert_is_named(checkpoint, tmp_path):
    folder = copy_of(checkpoint("v3"), tmp_path)
    rewrite_weights(folder, lambda w: w.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    expect_error(folder, "model.layers.2.mlp.experts.{E}.up_proj.weight", "missing [5]")


def test_shape_mismatch_names_tensor_expected_and_got(checkpoint, tmp_path):
    folder = copy_of(checkpoint("v3"), tmp_path)
    rewrite_weights(folder, lambda w: w.update({"model.norm.weight": mx.ones((63,))}))
    expect_error(folder, "model.norm.weight", "(63,)", "expected (64,)")


def test_config_that_does_not_match_the_weights(checkpoint, tmp_path):
    folder = copy_of(checkpoint("v3"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["kv_lora_rank"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    expect_error(folder, "kv_a_proj_with_mqa.weight", "expected (32, 64)")


def test_truncated_safetensors_file(checkpoint, tmp_path):
    folder = copy_of(checkpoint("v3"), tmp_path)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    expect_error(folder, "model.safetensors", "truncated or corrupt")


def test_garbage_safetensors_header(checkpoint, tmp_path):
    folder = copy_of(checkpoint("v3"), tmp_path)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    expect_error(folder, "not a valid safetensors file")


def write_index(folder, weight_map):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def index_to(folder, target):
    names = mx.load(str(folder / "model.safetensors")).keys()
    write_index(folder, {n: "model.safetensors" for n in names} | {"model.norm.weight": target})


def test_index_pointing_to_a_missing_shard(checkpoint, tmp_path):
    folder = copy_of(checkpoint("v3"), tmp_path)
    index_to(folder, "model-00002-of-00002.safetensors")
    expect_error(folder, "shard model-00002-of-00002.safetensors is missing")


def test_index_pointing_outside_the_folder(checkpoint, tmp_path):
    folder = copy_of(checkpoint("v3"), tmp_path)
    shutil.copy(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
    index_to(folder, "../elsewhere.safetensors")
    expect_error(folder, "outside the model folder")


def test_sharded_checkpoint_loads(checkpoint, tmp_path):
    folder = copy_of(checkpoint("v3"), tmp_path)
    weights = dict(mx.load(str(folder / "model.safetensors")))
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        mx.save_safetensors(str(folder / file), {n: weights[n] for n in part})
    write_index(folder, {n: f for f, part in halves.items() for n in part})
    reference = np.array(load_model(checkpoint("v3"))(mx.array(tokens(8))))
    assert rel_err(np.array(load_model(folder)(mx.array(tokens(8)))), reference) == 0.0


def test_fp8_tensors_without_fp8_config_are_named(checkpoint, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = copy_of(checkpoint("v3"), tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.float8_e4m3fn)
    save_file(state, str(folder / "model.safetensors"))
    expect_error(folder, "model.safetensors", "announces no FP8")


def test_unknown_model_type_names_folder_and_type(checkpoint, tmp_path):
    folder = copy_of(checkpoint("v3"), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "qwen3_moe"
    (folder / "config.json").write_text(json.dumps(config))
    expect_error(folder, str(folder), "'qwen3_moe'", error=ConfigError)


def test_not_a_folder_nor_a_repo_id(tmp_path):
    expect_error(tmp_path / "nope", "no such folder")


def test_offline_hub_download_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expect_error("mlx-community/not-cached-anywhere-4bit", "offline", "local folder")
