"""python -m convert: outputs equal the reference on the same (dequantized) weights; bad input writes nothing."""

import json
import math
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import rel_err, tokens

from convert.cli import main as convert_main
from mlx_deepseek import load_model

ALIGNED = dict(q_lora_rank=64, qk_nope_head_dim=32, v_head_dim=32)


def convert(src, dst, *flags):
    return convert_main(["--hf-path", str(src), "--mlx-path", str(dst), *flags])


def hf_logits(folder, toks, replaced=None):
    """transformers on `folder` (float32), with some checkpoint tensors replaced if given."""
    import tempfile

    import transformers
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        if replaced:
            state = read_state(folder)
            assert set(replaced) <= set(state), set(replaced) - set(state)
            shutil.copytree(folder, tmp, dirs_exist_ok=True)
            save_file({**state, **replaced}, f"{tmp}/model.safetensors")
            folder = tmp
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return model(torch.tensor(toks)).logits.numpy()


def read_state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def ours(folder, toks, dtype=None):
    return np.array(load_model(folder, dtype=dtype)(mx.array(toks)).astype(mx.float32))


@pytest.mark.parametrize("variant", ["v2_lite", "v3"])
def test_unquantized_float32(variant, checkpoint, tmp_path):
    src = checkpoint(variant)
    assert convert(src, tmp_path / "out") == 0
    toks = tokens(32)
    assert rel_err(ours(tmp_path / "out", toks), hf_logits(src, toks)) < 1e-4


def test_bfloat16_source_stays_bfloat16_and_exact(checkpoint, tmp_path):
    src = checkpoint("v2", dtype="bfloat16")
    assert convert(src, tmp_path / "out") == 0
    w = mx.load(str(tmp_path / "out/model.safetensors"))
    assert w["model.layers.1.mlp.switch_mlp.up_proj.weight"].dtype == mx.bfloat16
    toks = tokens(32)
    assert rel_err(ours(tmp_path / "out", toks, dtype=mx.float32), hf_logits(src, toks)) < 1e-4


def is_fp8_projection(name):
    return "proj" in name and "gate.weight" not in name


def make_fp8(src, dst, block=128, fp8=is_fp8_projection):
    """DeepSeek's FP8 format: every 2-D projection (`fp8(name)`) as float8_e4m3fn + weight_scale_inv per block."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    state, out, dequantized = read_state(src), {}, {}
    for name, w in state.items():
        if w.ndim == 2 and fp8(name):
            rows, cols = w.shape
            R, C = math.ceil(rows / block), math.ceil(cols / block)
            padded = torch.zeros(R * block, C * block)
            padded[:rows, :cols] = w
            blocks = padded.reshape(R, block, C, block)
            scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
            q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
            deq = (q.float() * scale[:, None, :, None]).reshape(R * block, C * block)[:rows, :cols]
            out[name] = q.reshape(R * block, C * block)[:rows, :cols].contiguous()
            out[name + "_scale_inv"] = scale.float()
            dequantized[name] = deq.contiguous()
        else:
            out[name] = w
    (dst / "model.safetensors").unlink()
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [block, block]}
    (dst / "config.json").write_text(json.dumps(config))
    return dequantized


def test_block_fp8_with_partial_blocks(checkpoint, tmp_path):
    """hidden 160 and intermediate 200: every matrix has full and partial 128-blocks."""
    src = checkpoint("v3", hidden_size=160, intermediate_size=200, moe_intermediate_size=96)
    dequantized = make_fp8(src, tmp_path / "fp8")
    assert convert(tmp_path / "fp8", tmp_path / "out", "--dtype", "float32") == 0
    toks = tokens(32)
    assert rel_err(ours(tmp_path / "out", toks), hf_logits(src, toks, dequantized)) < 1e-4


def test_pytorch_bin(checkpoint, tmp_path):
    src = checkpoint("v2_lite")
    dst = tmp_path / "bin"
    shutil.copytree(src, dst)
    torch.save(read_state(src), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    assert convert(dst, tmp_path / "out") == 0
    toks = tokens(32)
    assert rel_err(ours(tmp_path / "out", toks), hf_logits(src, toks)) < 1e-4


def quantize_dequantize(w: torch.Tensor, bits, group_size, mode="affine") -> torch.Tensor:
    a = mx.array(w.numpy())
    return torch.tensor(np.array(mx.dequantize(*mx.quantize(a, group_size, bits, mode=mode), group_size=group_size,
                                               bits=bits, mode=mode)))


def dequantized_reference_state(src, family, bits, group_size, args, mode="affine"):
    """What the quantized output should compute: each weight quantized and dequantized in the output's layout.

    `bits` is a number or a function of the checkpoint tensor name."""
    H, nope, v, R = 4, args["qk_nope_head_dim"], args["v_head_dim"], 32
    state = {}
    for name, w in read_state(src).items():
        if w.ndim != 2 or name.endswith(("norm.weight", "gate.weight")):
            continue
        b = bits(name) if callable(bits) else bits
        if name.endswith("kv_b_proj.weight") and family == "deepseek_v3":
            per_head = w.reshape(H, nope + v, R)
            k = quantize_dequantize(per_head[:, :nope].transpose(1, 2).contiguous(), b, group_size, mode)
            val = quantize_dequantize(per_head[:, nope:].contiguous(), b, group_size, mode)
            state[name] = torch.cat([k.transpose(1, 2), val], dim=1).reshape(H * (nope + v), R)
        else:
            state[name] = quantize_dequantize(w, b, group_size, mode)
    return state


@pytest.mark.parametrize("variant,family", [("v2", "deepseek_v2"), ("v3", "deepseek_v3")])
def test_quantized_equals_reference_on_dequantized_weights(variant, family, checkpoint, tmp_path):
    src = checkpoint(variant, **ALIGNED)
    assert convert(src, tmp_path / "out", "-q", "--q-group-size", "32") == 0
    toks = tokens(32)
    reference = hf_logits(src, toks, dequantized_reference_state(src, family, 4, 32, ALIGNED))
    assert rel_err(ours(tmp_path / "out", toks), reference) < 1e-4


def test_recipe_gives_the_bits_it_promises_and_mlx_lm_agrees(checkpoint, tmp_path):
    import mlx_lm

    src = checkpoint("v3", **ALIGNED)
    assert convert(src, tmp_path / "out", "-q", "--q-group-size", "32", "--recipe",
                   "routed_experts=3,attention=6,embed=8,head=8") == 0
    config = json.loads((tmp_path / "out/config.json").read_text())["quantization"]
    w = mx.load(str(tmp_path / "out/model.safetensors"))

    def bits_of(module, cols):
        return w[f"{module}.weight"].shape[-1] * 32 // cols

    assert bits_of("model.layers.1.mlp.switch_mlp.gate_proj", 64) == 3
    assert bits_of("model.layers.1.self_attn.o_proj", 128) == 6
    assert bits_of("model.embed_tokens", 64) == 8 and bits_of("lm_head", 64) == 8
    assert bits_of("model.layers.1.mlp.shared_experts.up_proj", 64) == 4  # the -q default
    assert "model.layers.1.mlp.gate.weight" in w and "model.layers.1.mlp.gate.scales" not in w
    assert w["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    assert config["model.layers.1.mlp.switch_mlp.gate_proj"]["bits"] == 3
    toks = mx.array(tokens(32))
    theirs, _ = mlx_lm.load(str(tmp_path / "out"))
    assert rel_err(np.array(load_model(tmp_path / "out")(toks)), np.array(theirs(toks))) < 1e-4

    def recipe_bits(name):
        if ".mlp.experts." in name:
            return 3
        if ".self_attn." in name:
            return 6
        return 8 if name.startswith(("model.embed_tokens", "lm_head")) else 4

    reference = hf_logits(src, np.array(toks), dequantized_reference_state(src, "deepseek_v3", recipe_bits, 32, ALIGNED))
    assert rel_err(ours(tmp_path / "out", np.array(toks)), reference) < 1e-4


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8"])
def test_mx_modes_load_in_both_runners(mode, checkpoint, tmp_path):
    import mlx_lm

    src = checkpoint("v2", **ALIGNED)
    bits = "8" if mode == "mxfp8" else "4"
    assert convert(src, tmp_path / "out", "-q", "--q-mode", mode, "--q-bits", bits) == 0
    toks = mx.array(tokens(16))
    theirs, _ = mlx_lm.load(str(tmp_path / "out"))
    assert rel_err(np.array(load_model(tmp_path / "out")(toks)), np.array(theirs(toks))) < 1e-4


def test_mtp_layer_is_carried_or_dropped(checkpoint, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "mtp"
    shutil.copytree(checkpoint("v3"), src)
    state = read_state(src)
    for k in [k for k in state if k.startswith("model.layers.2.")]:
        state[k.replace("layers.2.", "layers.3.")] = state[k].clone()
    state["model.layers.3.eh_proj.weight"] = torch.randn(64, 128)
    save_file(state, str(src / "model.safetensors"))
    assert convert(src, tmp_path / "kept") == 0 and convert(src, tmp_path / "dropped", "--drop-mtp") == 0
    kept = mx.load(str(tmp_path / "kept/model.safetensors"))
    assert kept["model.layers.3.mlp.switch_mlp.up_proj.weight"].shape == (16, 32, 64)
    assert "model.layers.3.eh_proj.weight" in kept
    assert not any(k.startswith("model.layers.3.") for k in mx.load(str(tmp_path / "dropped/model.safetensors")))
    toks = tokens(16)
    assert rel_err(ours(tmp_path / "kept", toks), ours(tmp_path / "dropped", toks)) == 0.0


def test_existing_output_needs_force(checkpoint, tmp_path, capsys):
    src, dst = checkpoint("v3"), tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert convert(src, dst) == 1
    assert "exists; pass --force" in capsys.readouterr().err and (dst / "keep.txt").exists()
    assert convert(src, dst, "--force") == 0
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def broken(checkpoint, tmp_path, edit):
    src = tmp_path / "src"
    shutil.copytree(checkpoint("v3"), src)
    edit(src)
    return src


def edit_config(**changes):
    def edit(src):
        config = json.loads((src / "config.json").read_text())
        config.update(changes)
        (src / "config.json").write_text(json.dumps(config))
    return edit


def edit_weights(fn):
    def edit(src):
        from safetensors.torch import save_file

        state = read_state(src)
        fn(state)
        save_file(state, str(src / "model.safetensors"))
    return edit


def truncate(src):
    f = src / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-500])


def index_to(target):
    def edit(src):
        names = read_state(src).keys()
        (src / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {n: "model.safetensors" for n in names} | {"model.norm.weight": target}}))
    return edit


def fp8_without_scale(src):
    make_fp8_state = read_state(src)
    edit_config(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})(src)
    from safetensors.torch import save_file

    make_fp8_state["model.layers.0.self_attn.o_proj.weight"] = make_fp8_state[
        "model.layers.0.self_attn.o_proj.weight"].to(torch.float8_e4m3fn)
    save_file(make_fp8_state, str(src / "model.safetensors"))


@pytest.mark.parametrize("edit,message", [
    (edit_config(model_type="mixtral"), "model_type 'mixtral' is not supported"),
    (index_to("model-00009.safetensors"), "shard model-00009.safetensors is missing"),
    (index_to("../../etc/passwd"), "outside the model folder"),
    (truncate, "truncated or corrupt"),
    (edit_weights(lambda s: s.pop("model.layers.1.self_attn.q_a_proj.weight")), "missing tensor"),
    (edit_weights(lambda s: s.update({"model.norm.weight": torch.ones(65)})), "model.norm.weight has shape (65,)"),
    (edit_weights(lambda s: s.update({"model.layers.1.mlp.experts.3.up_proj.weight": torch.ones(33, 64)})),
     "model.layers.1.mlp.experts.3.up_proj.weight has shape (33, 64)"),
    (edit_weights(lambda s: s.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)})), "dtype I32"),
    (fp8_without_scale, "has no model.layers.0.self_attn.o_proj.weight_scale_inv"),
    (edit_config(quantization_config={"quant_method": "gptq", "bits": 4}), "'gptq' is not supported"),
])
def test_bad_input_is_named_and_nothing_is_written(edit, message, checkpoint, tmp_path, capsys):
    src = broken(checkpoint, tmp_path, edit)
    assert convert(src, tmp_path / "out", "-q") == 1
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unknown_recipe_kind_is_an_error(checkpoint, tmp_path, capsys):
    assert convert(checkpoint("v3"), tmp_path / "out", "-q", "--recipe", "experts=3") == 1
    assert "'experts=3' is not a rule" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_not_enough_disk_space_is_said_up_front(checkpoint, tmp_path, capsys, monkeypatch):
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    assert convert(checkpoint("v3"), tmp_path / "out") == 1
    assert "GB free" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_a_failure_mid_write_leaves_no_folder(checkpoint, tmp_path, monkeypatch):
    from convert import plan

    calls = {"n": 0}
    real = plan._tensor_job

    def failing(*a, **k):
        job = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            def boom():
                raise KeyboardInterrupt  # as if the user pressed Ctrl-C halfway
                yield
            job.produce = boom
        return job

    monkeypatch.setattr(plan, "_tensor_job", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(checkpoint("v3"), tmp_path / "out")
    assert not list(tmp_path.iterdir())
