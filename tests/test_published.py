"""Checkpoints as published: block-FP8 read directly and quantize-on-load, each equal to the
converter's output loaded (same logits, bit for bit) and to transformers on the same weights;
PyTorch .bin in both pickle formats, and pickles that want to run code refused without running it."""

import pickle
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err, tokens
from test_convert import convert, hf_logits, make_fp8, ours, read_state

from mlx_deepseek import CheckpointError, load, load_model

PARTIAL = dict(hidden_size=160, intermediate_size=200, moe_intermediate_size=96)  # full and partial 128-blocks


@pytest.fixture(scope="module")
def fp8(checkpoint, tmp_path_factory):
    src = checkpoint("v3", **PARTIAL)
    folder = tmp_path_factory.mktemp("fp8") / "fp8"
    return src, folder, make_fp8(src, folder)


def logits(model, toks):
    return np.array(model(mx.array(toks)).astype(mx.float32))


def test_block_fp8_loads_directly_and_equals_the_converter(fp8, tmp_path):
    src, folder, dequantized = fp8
    toks = tokens(32)
    direct = logits(load_model(folder, dtype=mx.float32), toks)
    assert convert(folder, tmp_path / "out", "--dtype", "float32") == 0
    assert np.array_equal(direct, ours(tmp_path / "out", toks))
    assert rel_err(direct, hf_logits(src, toks, dequantized)) < 1e-4


def test_block_fp8_defaults_to_the_checkpoint_dtype(fp8, tmp_path):
    _, folder, _ = fp8
    model = load_model(folder)  # the tiny checkpoint says float32; DeepSeek's say bfloat16
    assert model.model.layers[1].mlp.switch_mlp.up_proj.weight.dtype == mx.float32
    assert model.model.layers[1].mlp.switch_mlp.up_proj.weight.shape == (16, 96, 160)


def test_quantize_on_load_equals_the_converted_folder(fp8, tmp_path):
    _, folder, _ = fp8
    toks = tokens(32)
    model, _ = load(folder, quantize=4, group_size=32, dtype=mx.float32)
    assert "scales" in model.model.layers[1].mlp.switch_mlp.gate_proj
    assert convert(folder, tmp_path / "q4", "-q", "--q-group-size", "32", "--dtype", "float32") == 0
    assert np.array_equal(logits(model, toks), ours(tmp_path / "q4", toks))


def test_a_pipeline_stage_asks_for_a_conversion_instead_of_reading_fp8_whole(fp8):
    from mlx_deepseek.pipeline import load_stage

    with pytest.raises(CheckpointError, match="for a pipeline, convert it first"):
        load_stage(fp8[1], range(0, 2))


def test_quantize_on_load_of_a_float_checkpoint(checkpoint, tmp_path):
    src = checkpoint("v2_lite", q_lora_rank=64, qk_nope_head_dim=32, v_head_dim=32)
    toks = tokens(16)
    assert convert(src, tmp_path / "q8", "-q", "--q-bits", "8", "--q-group-size", "32") == 0
    assert np.array_equal(logits(load_model(src, quantize=8, group_size=32), toks), ours(tmp_path / "q8", toks))


def test_quantize_on_load_refuses_bad_settings_and_quantized_folders(checkpoint, tmp_path):
    src = checkpoint("v3")
    with pytest.raises(CheckpointError, match="bits"):
        load_model(src, quantize=7)
    assert convert(src, tmp_path / "q4", "-q", "--q-group-size", "32") == 0
    with pytest.raises(CheckpointError, match="already quantized"):
        load_model(tmp_path / "q4", quantize=4)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pytorch_bin_in_either_pickle_format_loads_and_converts(zip_format, checkpoint, tmp_path):
    import torch

    src = checkpoint("v2_lite")
    folder = tmp_path / "bin"
    shutil.copytree(src, folder)
    torch.save(read_state(src), folder / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    (folder / "model.safetensors").unlink()
    toks = tokens(16)
    expected = logits(load_model(src), toks)
    assert np.array_equal(logits(load_model(folder), toks), expected)
    assert convert(folder, tmp_path / "out") == 0
    assert np.array_equal(ours(tmp_path / "out", toks), expected)


class RunsCode:
    """A pickle that asks to call a function while it is unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copy, (__file__, str(self.marker)))


def unsafe_files(marker):
    import torch

    state = {"model.norm.weight": torch.ones(64), "evil": RunsCode(marker)}
    yield "zip", lambda f: torch.save(state, f)
    yield "legacy", lambda f: torch.save(state, f, _use_new_zipfile_serialization=False)
    yield "plain pickle", lambda f: f.write_bytes(pickle.dumps(state, protocol=2))
    yield "a custom class", lambda f: torch.save({"x": Custom()}, f)


class Custom:
    pass


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain pickle", "a custom class"])
def test_a_pickle_that_wants_to_run_code_is_refused_and_nothing_runs(kind, checkpoint, tmp_path, capsys):
    folder, marker = tmp_path / "bin", tmp_path / "ran"
    shutil.copytree(checkpoint("v2_lite"), folder)
    (folder / "model.safetensors").unlink()
    dict(unsafe_files(marker))[kind](folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="wants to execute code .*it was not loaded") as e:
        load_model(folder)
    assert "pytorch_model.bin" in str(e.value)
    assert convert(folder, tmp_path / "out") == 1
    assert "wants to execute code" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
