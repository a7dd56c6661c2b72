"""Expert-aware mixed precision: calibration counts, the bit allocation, and per-expert-width models."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err, tokens
from test_convert import ALIGNED, convert, dequantized_reference_state, hf_logits, ours

from convert.expert_bits import allocate
from convert.recipes import RecipeError
from mlx_deepseek import load_model
from mlx_deepseek.calibrate import USAGE_FORMAT, count_experts
from mlx_deepseek.calibrate import main as calibrate_main
from mlx_deepseek.models.moe import MoE
from mlx_deepseek.pipeline import load_stage


def direct_counts(model, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Router choices counted by running the layers by hand and asking each router."""
    counts = {}
    h = model.model.embed_tokens(mx.array(rows))
    for i, layer in enumerate(model.layers):
        h = h + layer.self_attn(layer.input_layernorm(h))
        x = layer.post_attention_layernorm(h)
        if isinstance(layer.mlp, MoE):
            indices, _ = layer.mlp.gate(x)
            counts[f"model.layers.{i}.mlp.switch_mlp"] = np.bincount(np.array(indices).ravel(),
                                                                     minlength=model.args.n_routed_experts)
        h = h + layer.mlp(x)
    return counts


@pytest.mark.parametrize("variant", ["v2", "v3"])
def test_calibration_counts_equal_a_direct_count_of_router_choices(variant, checkpoint):
    model = load_model(checkpoint(variant))
    rows = tokens(40, batch=5, seed=3)
    counted = count_experts(model, rows, batch_size=2, progress=False)
    direct = direct_counts(model, rows)
    assert counted.keys() == direct.keys() and len(direct) == 2  # layer 0 is dense
    for layer, c in counted.items():
        assert c == direct[layer].tolist()
        assert sum(c) == rows.size * model.args.num_experts_per_tok
    assert model.layers[1].mlp.gate.__class__.__name__ == "Router"  # the counting wrappers are gone


def test_calibration_command_writes_the_usage_file(checkpoint, tmp_path, capsys):
    data = tmp_path / "ids.npy"
    np.save(data, tokens(200, seed=4)[0])
    out = tmp_path / "usage.json"
    assert calibrate_main(["--model", str(checkpoint("v3")), "--data", str(data), "--window", "64",
                           "--output", str(out)]) == 0
    usage = json.loads(out.read_text())
    assert usage["format"] == USAGE_FORMAT and usage["tokens"] == 192  # 3 whole windows of 64
    assert all(sum(c) == 192 * 3 for c in usage["counts"].values())
    assert "never picked" in capsys.readouterr().out


def test_calibration_refuses_bad_input_before_running(checkpoint, tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama/config.json").write_text(json.dumps({"model_type": "llama"}))
    out = tmp_path / "usage.json"
    assert calibrate_main(["--model", str(tmp_path / "llama"), "--data", "text", "--output", str(out)]) == 1
    assert "model_type 'llama' is not supported" in capsys.readouterr().err
    assert calibrate_main(["--model", str(checkpoint("v3")), "--data", "text",
                           "--output", str(tmp_path / "no/usage.json")]) == 1
    assert "no folder" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "llama"]


def test_allocation_gives_busy_experts_more_bits_within_the_target():
    counts = {"a": [1000, 500, 100, 50, 10, 5, 1, 0], "b": [300, 300, 300, 300, 20, 20, 20, 20]}
    bits = allocate(counts, [2, 3, 4], target=3.0 + 0.5, overhead=0.5)
    flat = [b for layer in bits.values() for b in layer]
    assert 3.0 - 1 / 16 <= sum(flat) / len(flat) <= 3.0  # within one step's share of the target
    for layer, c in counts.items():  # more picks never means fewer bits
        order = np.argsort(c)
        assert all(np.diff(np.array(bits[layer])[order]) >= 0)
    assert bits["a"][0] == 4 and bits["a"][-1] == 2
    # uniform use: the error model has nothing to favour, so the widths stay as even as the budget allows
    even = allocate({"a": [7] * 8}, [2, 3, 4], target=3.0, overhead=0.0)
    assert sorted(even["a"]) == [3] * 8
    assert allocate({"a": [1, 2]}, [2, 4], target=9.0, overhead=0.0) == {"a": [4, 4]}
    with pytest.raises(RecipeError, match="below the lowest width"):
        allocate(counts, [2, 3], target=2.2, overhead=0.5)


def usage_file(path, counts):
    path.write_text(json.dumps({"format": USAGE_FORMAT, "counts": counts}))
    return path


# Layer 1 has a clear favourite order, layer 2 spreads its picks: widths 4, 3 and 2 all occur.
SKEWED = {"model.layers.1.mlp.switch_mlp": [900, 800, 700, 600, 500, 400, 300, 200, 100, 90, 80, 70, 60, 50, 0, 0],
          "model.layers.2.mlp.switch_mlp": [100] * 16}


def test_expert_aware_model_equals_the_reference_on_its_dequantized_weights(checkpoint, tmp_path):
    src = checkpoint("v3", **ALIGNED)
    usage = usage_file(tmp_path / "usage.json", SKEWED)
    out = tmp_path / "out"
    assert convert(src, out, "-q", "--q-group-size", "32", "--expert-usage", str(usage),
                   "--expert-bits", "2,3,4", "--target-bits", "5.0") == 0  # 3 bits + 2 for float32 scales

    kept = json.loads((out / "expert_usage.json").read_text())
    bits = kept["bits"]
    assert kept["counts"] == SKEWED and kept["target_bits"] == 5.0
    assert {b for layer in bits.values() for b in layer} == {2, 3, 4}
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert config["model.layers.1.mlp.switch_mlp"] == {"expert_bits": bits["model.layers.1.mlp.switch_mlp"]}
    assert set(bits["model.layers.2.mlp.switch_mlp"]) == {3}  # even use: one width, one plain stack
    assert "model.layers.2.mlp.switch_mlp" not in config
    assert config["model.layers.2.mlp.switch_mlp.gate_proj"]["bits"] == 3

    def bits_of(name):
        parts = name.split(".")
        if ".experts." in name:
            return bits[".".join(parts[:4]) + ".switch_mlp"][int(parts[5])]
        return 4

    toks = tokens(48)  # 48 tokens x 3 experts: the sorted (prefill) dispatch
    reference = hf_logits(src, toks, dequantized_reference_state(src, "deepseek_v3", bits_of, 32, ALIGNED))
    assert rel_err(ours(out, toks), reference) < 1e-4

    model = load_model(out)  # one token at a time: the unsorted (decode) dispatch
    assert type(model.layers[2].mlp.switch_mlp).__name__ == "RoutedExperts"
    cache = model.make_cache()
    steps = [model(mx.array(toks[:, :1]), cache=cache)]
    steps += [model(mx.array(toks[:, i : i + 1]), cache=cache) for i in range(1, toks.shape[1])]
    assert rel_err(np.array(mx.concatenate(steps, axis=1)), reference) < 1e-4

    # a pipeline stage holding the mixed layers builds the same stacks (layer names shift inside it)
    stage = load_stage(out, range(1, 3))
    assert stage.layers[0].mlp.switch_mlp.widths == model.layers[1].mlp.switch_mlp.widths
    h = mx.random.normal((1, 8, model.args.hidden_size))
    expected = model.layers[2](model.layers[1](h))
    assert rel_err(np.array(stage.run(h, [None, None])), np.array(expected)) < 1e-6


@pytest.mark.parametrize("counts,flags,message", [
    ({"model.layers.1.mlp.switch_mlp": [1] * 16}, [], "other layers than this model"),
    ({**SKEWED, "model.layers.1.mlp.switch_mlp": [1] * 8}, [], "has 8 counts, expected 16"),
    (SKEWED, ["--expert-bits", "2,7"], "widths must be among"),
    (SKEWED, ["--target-bits", "1.5"], "below the lowest width"),
    (SKEWED, ["--q-mode", "mxfp4"], "affine mode"),
])
def test_bad_expert_aware_input_is_named_and_nothing_is_written(counts, flags, message, checkpoint, tmp_path, capsys):
    usage = usage_file(tmp_path / "usage.json", counts)
    assert convert(checkpoint("v3", **ALIGNED), tmp_path / "out", "-q", "--expert-usage", str(usage), *flags) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_usage_file_is_refused(checkpoint, tmp_path, capsys):
    (tmp_path / "usage.json").write_text(json.dumps({"counts": SKEWED}))
    assert convert(checkpoint("v3"), tmp_path / "out", "-q", "--expert-usage", str(tmp_path / "usage.json")) == 1
    assert "not an expert-usage file" in capsys.readouterr().err


def test_even_use_gives_plain_stacks_that_mlx_lm_loads(checkpoint, tmp_path):
    import mlx_lm

    src = checkpoint("v3", **ALIGNED)
    even = {layer: [50] * 16 for layer in SKEWED}
    assert convert(src, tmp_path / "out", "-q", "--q-group-size", "32",
                   "--expert-usage", str(usage_file(tmp_path / "usage.json", even))) == 0
    assert "expert_bits" not in (tmp_path / "out/config.json").read_text()
    toks = tokens(16)
    theirs, _ = mlx_lm.load(str(tmp_path / "out"))
    assert rel_err(ours(tmp_path / "out", toks), np.array(theirs(mx.array(toks)))) < 1e-5
