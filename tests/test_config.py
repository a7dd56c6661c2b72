"""Real DeepSeek configs parse into the right network; bad configs fail with a clear message."""

import json

import mlx.core as mx
import pytest
from conftest import SHARED
from mlx.utils import tree_flatten

from mlx_deepseek import ConfigError, Model, ModelArgs
from mlx_deepseek.layout import to_model_layout

HF_CONFIGS = ["DeepSeek-V2-Lite", "DeepSeek-V3", "DeepSeek-V3-Base", "DeepSeek-R1", "DeepSeek-R1.2025-10-snapshot",
              "Kimi-K2-Instruct"]


def config(name):
    return json.loads((SHARED / "configs" / f"{name}.json").read_text())


def n_params(args):
    return sum(v.size for _, v in tree_flatten(Model(args).parameters()))  # lazy: nothing allocated


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_real_configs_parse(name):
    args = ModelArgs.from_dict(config(name))
    assert args.rope_scaling["factor"] > 1 and args.kv_lora_rank == 512


def test_v2_lite_has_exactly_the_published_parameter_count():
    """The safetensors index says 31,412,968,448 bytes of bf16: 15,706,484,224 parameters."""
    index = json.loads((SHARED / "configs/DeepSeek-V2-Lite.model.safetensors.index.json").read_text())
    assert n_params(ModelArgs.from_dict(config("DeepSeek-V2-Lite"))) * 2 == index["metadata"]["total_size"]


def test_v3_is_671b_without_its_mtp_layer_and_kimi_k2_is_1t():
    assert round(n_params(ModelArgs.from_dict(config("DeepSeek-V3"))) / 1e9) == 671
    assert round(n_params(ModelArgs.from_dict(config("Kimi-K2-Instruct"))) / 1e12, 2) == 1.03


def test_v2_lite_checkpoint_names_map_onto_our_modules():
    args = ModelArgs.from_dict(config("DeepSeek-V2-Lite"))
    names = json.loads((SHARED / "configs/DeepSeek-V2-Lite.model.safetensors.index.json").read_text())["weight_map"]
    kv_rows = args.num_attention_heads * (args.qk_nope_head_dim + args.v_head_dim)
    stand_ins = {n: mx.zeros((kv_rows, 1)) if "kv_b_proj" in n else mx.zeros((1,)) for n in names}
    mapped = to_model_layout(stand_ins, args, lambda p: None)
    assert mapped.keys() == {k for k, _ in tree_flatten(Model(args).parameters())}


def test_layer_kinds_follow_first_k_dense_replace():
    args = ModelArgs.from_dict(config("DeepSeek-V3"))
    assert [args.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]
    freq2 = ModelArgs.from_dict({**config("DeepSeek-V3"), "moe_layer_freq": 2})
    assert [freq2.is_moe_layer(i) for i in range(3, 7)] == [False, True, False, True]


def test_transformers5_rope_parameters_are_accepted():
    c = config("DeepSeek-V3")
    c["rope_parameters"] = {**c.pop("rope_scaling"), "rope_theta": c.pop("rope_theta"), "rope_type": "yarn"}
    args = ModelArgs.from_dict(c)
    assert args.rope_theta == 10000 and args.rope_scaling["factor"] == 40


def test_family_defaults_for_router_fields():
    c = config("DeepSeek-V3")
    del c["topk_method"], c["scoring_func"]
    args = ModelArgs.from_dict(c)
    assert (args.topk_method, args.scoring_func) == ("noaux_tc", "sigmoid")
    assert ModelArgs.from_dict({**config("Kimi-K2-Instruct")}).family == "deepseek_v3"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"kv_lora_rank": None}, "missing required field(s) ['kv_lora_rank']"),
        ({"topk_method": "top1"}, "topk_method='top1'"),
        ({"n_group": 7}, "n_group=7"),
        ({"topk_group": 9}, "topk_group=9"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling type 'linear' is not supported"),
        ({"rope_scaling": {"type": "yarn"}}, "missing 'factor'"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim=63"),
    ],
)
def test_bad_configs_name_the_field(change, message):
    c = {**config("DeepSeek-V3"), **change}
    with pytest.raises(ConfigError) as e:
        ModelArgs.from_dict(c)
    assert message in str(e.value)
