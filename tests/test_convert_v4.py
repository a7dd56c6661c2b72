"""python -m convert on DeepSeek-V4: FP8 (e8m0 block scales) and FP4 experts as DeepSeek publishes
them, bf16/float folders and transformers-5 folders; mlx-lm ports' folders load as they are.

The published-layout fixture is the tiny random `v4_small` model (tests/checkpoints.py `build_v4`)
re-encoded here from known values: projections DeepSeek stores in FP8 become e4m3 bytes with one
e8m0 scale per block (16x16 here, so that tiny matrices have several blocks, partial ones
included; the block size is read from config.json as for 128x128), routed experts become FP4
(random e2m1 codes, random e8m0 scales per 32). Beside it a float32 folder holds exactly the
values those bytes mean (decoded with the numpy reference arithmetic below): the reference.
"""

import hashlib
import json
import math
import shutil
import struct

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import ROOT, build_v4, write_tokenizer
from conftest import rel_err

from convert import fp4, fp8
from convert.cli import main as convert_main
from mlx_deepseek import load_model
from mlx_deepseek.loading import read_config

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
FP8_WEIGHT = r"\.(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|shared_experts\.w[123]|e_proj|h_proj)\.weight$"
FP4_WEIGHT = r"\.ffn\.experts\.\d+\.w[123]\.weight$"
BLOCK = 16


# ---- reference arithmetic (numpy, independent of convert/) --------------------------------------

def e8m0(b):
    return np.array([2.0 ** (int(x) - 127) for x in np.asarray(b).flat], np.float64).reshape(np.shape(b))


def fp4_reference(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Byte k of a row holds elements 2k (low nibble) and 2k + 1 (high nibble)."""
    rows, half = packed.shape
    out = np.empty((rows, half * 2), np.float64)
    out[:, 0::2] = E2M1[packed & 0x0F]
    out[:, 1::2] = E2M1[packed >> 4]
    return (out * np.repeat(e8m0(scale), 32, axis=1)).astype(np.float32)


def fp8_reference(q: np.ndarray, scale: np.ndarray, block) -> np.ndarray:
    values = torch.from_numpy(q).view(torch.float8_e4m3fn).float().numpy().astype(np.float64)
    s = np.repeat(np.repeat(e8m0(scale), block[0], axis=0), block[1], axis=1)[: q.shape[0], : q.shape[1]]
    return (values * s).astype(np.float32)


def encode_fp8(w: np.ndarray, block):
    """e4m3 bytes and e8m0 block scales (powers of two with the block's max within 448)."""
    rows, cols = w.shape
    R, C = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    exps = np.zeros((R, C), np.int64)
    scaled = np.zeros_like(w)
    for i in range(R):
        for j in range(C):
            blk = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            e = math.ceil(math.log2(max(np.abs(blk).max(), 1e-30) / 448.0))
            exps[i, j] = e
            scaled[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = blk / 2.0 ** e
    q = torch.from_numpy(scaled).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    return q, (exps + 127).astype(np.uint8)


def random_fp4(rng, rows, cols):
    codes = rng.integers(0, 16, (rows, cols)).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    scale = rng.integers(118, 124, (rows, cols // 32)).astype(np.uint8)
    return packed, scale


# ---- folders -------------------------------------------------------------------------------------

ST_NP = {"F32": np.float32, "I64": np.int64, "I32": np.int32, "U8": np.uint8, "I8": np.uint8, "F8_E4M3": np.uint8,
         "F8_E8M0": np.uint8, "U32": np.uint32, "BF16": np.uint16, "F16": np.float16}


def write_st(file, tensors: dict):
    """tensors: name -> (safetensors dtype, numpy array of its bytes); written by hand so that
    F8_E4M3, F8_E8M0 and I8 carry exactly the bytes given."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, a) in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_st(file) -> dict:
    raw = open(file, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = (info["dtype"], np.frombuffer(raw[8 + n + a : 8 + n + b], ST_NP[info["dtype"]]).reshape(info["shape"]))
    return out


def published(variant="v4_small"):
    """(published FP8/FP4 folder, float32 reference folder with the values it encodes), cached."""
    import re

    src = build_v4(variant, "native")
    key = hashlib.sha1(f"{src.name}-{BLOCK}-1".encode()).hexdigest()[:10]
    pub, ref = ROOT / f"{variant}-published-{key}", ROOT / f"{variant}-published-ref-{key}"
    if (pub / "config.json").exists() and (ref / "config.json").exists():
        return pub, ref
    rng = np.random.default_rng(7)
    tensors = {k: v for k, (_, v) in read_st(src / "model.safetensors").items()}
    out, values = {}, {}
    for name, w in tensors.items():
        if re.search(FP4_WEIGHT, name):
            packed, scale = random_fp4(rng, *w.shape)
            out[name], out[name[: -len("weight")] + "scale"] = ("I8", packed), ("F8_E8M0", scale)
            values[name] = fp4_reference(packed, scale)
        elif re.search(FP8_WEIGHT, name):
            q, scale = encode_fp8(w, (BLOCK, BLOCK))
            out[name], out[name[: -len("weight")] + "scale"] = ("F8_E4M3", q), ("F8_E8M0", scale)
            values[name] = fp8_reference(q, scale, (BLOCK, BLOCK))
        else:
            dtype = "I64" if w.dtype == np.int64 else "F32"
            out[name], values[name] = (dtype, w), w
    config = read_config(src)
    for folder, tensors_out, extra in [
        (pub, out, {"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                            "scale_fmt": "ue8m0", "weight_block_size": [BLOCK, BLOCK]},
                    "torch_dtype": "bfloat16"}),
        (ref, {k: ("I64" if v.dtype == np.int64 else "F32", v) for k, v in values.items()}, {"torch_dtype": "float32"}),
    ]:
        tmp = folder.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_st(tmp / "model.safetensors", tensors_out)
        (tmp / "config.json").write_text(json.dumps({**config, **extra}, indent=1))
        write_tokenizer(tmp, config["vocab_size"])
        tmp.rename(folder)
    return pub, ref


def convert(src, dst, *flags):
    return convert_main(["--hf-path", str(src), "--mlx-path", str(dst), *flags])


TOKENS = np.random.RandomState(3).randint(2, 160, (1, 70))


def logits(model):
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def dequantized(folder) -> dict:
    """Every tensor of a converted folder as float32 (quantized modules dequantized per config.json)."""
    config = read_config(folder)
    q = config.get("quantization") or {}
    tensors = mx.load(str(folder / "model.safetensors"))
    out = {}
    for name, value in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name[: -len(".weight")]
        if f"{module}.scales" in tensors:
            p = {**{k: q[k] for k in ("group_size", "bits", "mode")}, **(q.get(module) or {})}
            out[name] = mx.dequantize(value, tensors[f"{module}.scales"], tensors.get(f"{module}.biases"),
                                      p["group_size"], p["bits"], mode=p["mode"], dtype=mx.float32)
        else:
            out[name] = value
    return out


def model_on(folder_like, weights: dict, mtp=False):
    """Our V4 model on float weights given in our module names (the reference on dequantized weights)."""
    from mlx_deepseek.models import args_from_config
    from mlx_deepseek.models.deepseek_v4 import Model

    args = args_from_config(read_config(folder_like))
    model = Model(args, mtp=mtp)
    model.load_weights([(k, v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v)
                        for k, v in weights.items() if mtp or not k.startswith("mtp.")])
    return model


# ---- FP8 / FP4 arithmetic -------------------------------------------------------------------------

def test_e8m0_decodes_every_byte_exactly():
    b = np.arange(256, dtype=np.uint8)
    got = np.array(fp8.decode_scale(mx.array(b), "F8_E8M0"))
    assert np.array_equal(got[:255], e8m0(b[:255]).astype(np.float32)) and np.isnan(got[255])
    assert got[0] == 2.0**-127 and got[127] == 1.0 and got[254] == 2.0**127


def test_fp8_with_e8m0_block_scales_full_and_partial_blocks():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((200, 300)) * np.exp(rng.standard_normal((200, 1)))).astype(np.float32)
    q, scale = encode_fp8(w, (128, 128))  # 2 x 3 blocks, the last row and column partial
    got = np.array(fp8.dequantize(mx.array(q), mx.array(scale), (128, 128), "F8_E8M0"))
    assert np.array_equal(got, fp8_reference(q, scale, (128, 128)))
    # the same routine with V3's float32 scale_inv
    got32 = np.array(fp8.dequantize(mx.array(q), mx.array(e8m0(scale).astype(np.float32)), (128, 128), "F32"))
    assert np.array_equal(got32, got)


def test_fp4_dequantization_and_nibble_order():
    # one row, known codes: 0.5 (code 1) in the low nibble, -3 (code 13) in the high nibble
    packed = np.zeros((1, 16), np.uint8)
    packed[0, 0] = 1 | (13 << 4)
    scale = np.array([[128]], np.uint8)  # 2^1
    got = np.array(fp4.dequantize(mx.array(packed), mx.array(scale)))
    assert got[0, 0] == 1.0 and got[0, 1] == -6.0 and not got[0, 2:].any()
    packed, scale = random_fp4(np.random.default_rng(1), 64, 96)
    assert np.array_equal(np.array(fp4.dequantize(mx.array(packed), mx.array(scale))), fp4_reference(packed, scale))


def test_fp4_is_mlx_mxfp4_bit_for_bit():
    packed, scale = random_fp4(np.random.default_rng(2), 48, 128)
    reference = fp4_reference(packed, scale)
    w, s = fp4.as_mxfp4(mx.array(packed), mx.array(scale))
    assert w.dtype == mx.uint32 and w.shape == (48, 16) and s.shape == (48, 4)
    deq = mx.dequantize(w, s, None, 32, 4, mode="mxfp4", dtype=mx.float32)
    assert np.array_equal(np.array(deq), reference)
    # and MLX's own mxfp4 quantization of those values gives back DeepSeek's bytes (where a group's
    # largest magnitude is 4 or 6, its scale is unambiguous)
    qw, qs = mx.quantize(mx.array(reference), 32, 4, mode="mxfp4")
    groups = np.abs(reference).reshape(48, 4, 32).max(axis=-1) / e8m0(scale) >= 4
    assert np.array_equal(np.array(qs)[groups], scale[groups])
    rows = groups.all(axis=1)
    lo, hi = packed & 0x0F, packed >> 4
    positive_zero = np.where(lo == 8, 0, lo) | (np.where(hi == 8, 0, hi) << 4)  # MLX writes -0.0 as code 0
    assert np.array_equal(np.array(qw).view(np.uint8)[rows], positive_zero[rows])
    # so a float dump of FP4 experts (bf16 holds e2m1 x 2^k exactly) requantizes to the same values,
    # whatever a group's largest code: MLX picks a smaller scale and larger codes, the products agree
    for magnitude in (7, 3, 1):  # codes up to 6, up to 1.5, up to 0.5 (sign kept)
        small = packed & ((8 | magnitude) * 0x11)
        values = fp4_reference(small, scale)
        back = mx.dequantize(*mx.quantize(mx.array(values), 32, 4, mode="mxfp4"), None, 32, 4, mode="mxfp4",
                             dtype=mx.float32)
        assert np.array_equal(np.array(back), values)


# ---- conversions ----------------------------------------------------------------------------------

def test_published_fp8_fp4_default_recipe(tmp_path):
    """Default: experts carried byte for byte into mxfp4, the rest 8-bit; equals our model on the
    converted (dequantized) weights, which are the reference values quantized exactly so."""
    pub, ref = published()
    assert convert(pub, tmp_path / "out", "--dtype", "float32") == 0
    out = tmp_path / "out"
    config = read_config(out)
    q = config["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (8, 64, "affine")
    assert q["layers.1.ffn.switch_mlp.gate_proj"] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    stored, src = read_st(out / "model.safetensors"), read_st(pub / "model.safetensors")
    # FP4 bytes carried as they are
    for e in (0, 5):
        w = stored["layers.2.ffn.switch_mlp.down_proj.weight"][1][e].view(np.uint8)
        assert np.array_equal(w, src[f"layers.2.ffn.experts.{e}.w2.weight"][1])
        assert np.array_equal(stored["layers.2.ffn.switch_mlp.down_proj.scales"][1][e],
                              src[f"layers.2.ffn.experts.{e}.w2.scale"][1])
    # never quantized, in float32 / int32
    for name in ("layers.0.ffn.gate.tid2eid", "layers.1.ffn.gate.bias", "layers.1.hc_attn.fn", "layers.1.attn.attn_sink",
                 "layers.1.attn.compressor.ape", "hc_head.base", "layers.1.attn_norm.weight", "layers.1.ffn.gate.weight"):
        assert name in stored and name.rpartition(".")[0] + ".scales" not in stored, name
    assert stored["layers.0.ffn.gate.tid2eid"][0] == "I32"
    deq = dequantized(out)
    ref_w = {k: v for k, v in mx.load(str(ref / "model.safetensors")).items()}
    assert mx.array_equal(deq["layers.3.ffn.switch_mlp.up_proj.weight"][4], ref_w["layers.3.ffn.experts.4.w3.weight"])
    wq = ref_w["layers.1.attn.wq_a.weight"]  # FP8 -> exact float -> 8 bits
    assert mx.array_equal(deq["layers.1.attn.wq_a.weight"],
                          mx.dequantize(*mx.quantize(wq, 64, 8), 64, 8, dtype=mx.float32))
    # wq_b (24 inputs: no group of 64 fits) stays float: the FP8 values exactly
    assert mx.array_equal(deq["layers.1.attn.wq_b.weight"], ref_w["layers.1.attn.wq_b.weight"])
    ours = logits(load_model(out))
    assert rel_err(ours, logits(model_on(out, deq))) < 1e-4
    assert load_model(out, mtp=True).mtp is not None


def test_published_unquantized_equals_reference(tmp_path):
    """Only the experts as shipped, the rest in float32: the reference's values exactly."""
    pub, ref = published()
    assert convert(pub, tmp_path / "out", "--dtype", "float32", "--recipe", "routed_experts=4:32:mxfp4") == 0
    assert rel_err(logits(load_model(tmp_path / "out")), logits(load_model(ref))) < 1e-5
    assert convert(pub, tmp_path / "float", "--dtype", "float32", "--recipe", "routed_experts=none") == 0
    assert rel_err(logits(load_model(tmp_path / "float")), logits(load_model(ref))) < 1e-6


def test_pytorch_bin_with_fp8_and_fp4(tmp_path):
    """The same checkpoint as a PyTorch .bin (e4m3, e8m0 and int8 tensors): the same output."""
    pub, _ = published()
    views = {"F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "I8": torch.int8}
    state = {k: torch.from_numpy(a.copy()).view(views[d]) if d in views else torch.from_numpy(a.copy())
             for k, (d, a) in read_st(pub / "model.safetensors").items()}
    src = tmp_path / "bin"
    shutil.copytree(pub, src)
    (src / "model.safetensors").unlink()
    torch.save(state, src / "pytorch_model.bin")
    assert convert(src, tmp_path / "a") == 0 and convert(pub, tmp_path / "b") == 0
    a, b = read_st(tmp_path / "a/model.safetensors"), read_st(tmp_path / "b/model.safetensors")
    assert a.keys() == b.keys() and all(a[k][0] == b[k][0] and np.array_equal(a[k][1], b[k][1]) for k in a)


def test_q_bits_still_work_and_drop_mtp(tmp_path):
    pub, _ = published()
    assert convert(pub, tmp_path / "out", "-q", "--q-bits", "2", "--dtype", "float32", "--drop-mtp") == 0
    out = tmp_path / "out"
    q = read_config(out)["quantization"]
    assert (q["bits"], q["mode"]) == (2, "affine") and "layers.1.ffn.switch_mlp.gate_proj" not in q
    assert read_config(out)["num_nextn_predict_layers"] == 0
    deq = dequantized(out)
    assert not any(k.startswith("mtp.") for k in deq)
    assert rel_err(logits(load_model(out)), logits(model_on(out, deq))) < 1e-4


def test_transformers_layout(tmp_path):
    """transformers 5 save_pretrained (float32): unquantized equals transformers, default recipe
    equals our model on its dequantized weights."""
    import transformers

    src = build_v4("v4_small", "hf")
    assert convert(src, tmp_path / "float", "--recipe", "routed_experts=none") == 0
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor(TOKENS)).logits.numpy()
    assert rel_err(logits(load_model(tmp_path / "float")), expected) < 1e-4
    assert convert(src, tmp_path / "out") == 0  # experts quantized to mxfp4 (they were float), the rest 8-bit
    out = tmp_path / "out"
    assert read_config(out)["quantization"]["layers.1.ffn.switch_mlp.gate_proj"]["mode"] == "mxfp4"
    assert rel_err(logits(load_model(out)), logits(model_on(out, dequantized(out)))) < 1e-4


def test_fused_expert_tensors_are_read_one_expert_at_a_time(tmp_path, monkeypatch):
    """transformers' in-memory layout (`mlp.experts.gate_up_proj` (E, 2I, D), `down_proj` (E, D, I)):
    each expert is read as its own rows of the stacked tensor, never the whole stack."""
    import re

    from convert import sources

    src = build_v4("v4_small", "hf")
    fused = tmp_path / "fused"
    shutil.copytree(src, fused)
    tensors = read_st(src / "model.safetensors")
    out, n = {}, read_config(src)["n_routed_experts"]
    for name, (dtype, a) in tensors.items():
        m = re.match(r"^(model\.layers\.\d+)\.ffn\.experts\.(\d+)\.w1\.weight$", name)
        if m:
            layer = m.group(1)
            if m.group(2) == "0":
                e = lambda w: [tensors[f"{layer}.ffn.experts.{i}.{w}.weight"][1] for i in range(n)]  # noqa: E731
                out[f"{layer}.mlp.experts.gate_up_proj"] = ("F32", np.stack([np.concatenate([a1, a3]) for a1, a3
                                                                            in zip(e("w1"), e("w3"))]))
                out[f"{layer}.mlp.experts.down_proj"] = ("F32", np.stack(e("w2")))
        elif ".ffn.experts." not in name:
            out[name] = (dtype, a)
    write_st(fused / "model.safetensors", out)
    reads = []
    original = sources.Source.read
    monkeypatch.setattr(sources.Source, "read", lambda self, name, rows=None: (reads.append((name, rows)),
                                                                                 original(self, name, rows))[1])
    assert convert(fused, tmp_path / "a", "--recipe", "routed_experts=none") == 0
    assert convert(src, tmp_path / "b", "--recipe", "routed_experts=none") == 0
    stacked = [rows for name, rows in reads if name.endswith(("gate_up_proj", "down_proj"))]
    assert stacked and all(rows is not None and rows[1] - rows[0] == 1 for rows in stacked)
    a, b = mx.load(str(tmp_path / "a/model.safetensors")), mx.load(str(tmp_path / "b/model.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)


# ---- mlx-lm ports' folders -------------------------------------------------------------------------

def _port_name(name: str, style: str) -> str:
    import re

    if style == "deepseek":  # DeepSeek's names, quantized: experts pre-stacked as experts.w1 ...
        name = re.sub(r"\.switch_mlp\.(gate|up|down)_proj\.",
                      lambda m: {"gate": ".experts.w1.", "up": ".experts.w3.", "down": ".experts.w2."}[m.group(1)], name)
        name = re.sub(r"\.shared_experts\.(gate|up|down)_proj\.",
                      lambda m: {"gate": ".shared_experts.w1.", "up": ".shared_experts.w3.",
                                 "down": ".shared_experts.w2."}[m.group(1)], name)
        name = re.sub(r"(^|\.)hc_(attn|ffn|head)\.(fn|base|scale)$", r"\1hc_\2_\3", name)
        return re.sub(r"^mtp\.(block\.)?", "mtp.0.", name)
    if name.startswith("mtp."):
        name = "mtp.0." + name[len("mtp."):]
    name = re.sub(r"^embed\.", "model.embed_tokens.", name)
    name = re.sub(r"^head\.", "lm_head.", name)
    name = re.sub(r"^(norm\.|hc_head\.|layers\.)", r"model.\1", name)
    name = name.replace(".ffn.gate.bias", ".ffn.gate.e_score_correction_bias")
    if style == "pr1192":
        name = re.sub(r"\.hc_(attn|ffn)\.", r".\1_hc.", name)
    return name


def write_port(out, folder, style):
    """Our converted folder rewritten in a port's layout (same bytes): pr1189 / pr1797 (mlx-lm names,
    flat wo_a, MTP as mtp.0.block), pr1192 (attn_hc naming, no MTP), deepseek (DeepSeek's names,
    pre-stacked experts, wo_a per group)."""
    import re

    shutil.copytree(out, folder)
    tensors, config = read_st(out / "model.safetensors"), read_config(out)
    groups = config["o_groups"]
    new = {}
    for name, (dtype, a) in tensors.items():
        if style == "pr1192" and name.startswith("mtp."):
            continue
        port = _port_name(name, style)
        if ".attn.wo_a." in name:
            if style == "deepseek":
                for g in range(groups):
                    new[port.replace(".wo_a.", f".wo_a.{g}.")] = (dtype, a[g])
                continue
            a = a.reshape(-1, a.shape[-1])
        new[port] = (dtype, a)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").unlink()
    write_st(folder / "model.safetensors", new)
    q = config["quantization"]
    config["quantization"] = {(_port_name(k + ".weight", style)[: -len(".weight")] if isinstance(v, dict) else k): v
                              for k, v in q.items()}
    config.pop("quantization_config", None)
    if style == "pr1192":
        config["num_nextn_predict_layers"] = 0
    (folder / "config.json").write_text(json.dumps(config))
    assert any(re.match(r"^model\.layers\.1\.|^layers\.1\.ffn\.experts\.w1\.", n) for n in new)
    return folder


@pytest.mark.parametrize("style", ["pr1189", "pr1192", "deepseek"])
def test_mlx_lm_port_folders_load_as_they_are(style, tmp_path):
    pub, _ = published()
    assert convert(pub, tmp_path / "out", "--dtype", "float32") == 0
    expected = logits(load_model(tmp_path / "out"))
    port = write_port(tmp_path / "out", tmp_path / style, style)
    assert np.array_equal(logits(load_model(port)), expected)
    if style != "pr1192":
        assert load_model(port, mtp=True).mtp is not None


@pytest.mark.parametrize("style", ["pr1189", "pr1192"])
def test_the_ports_own_code_loads_these_folders(style, tmp_path):
    """Checks the layouts above against the ports themselves, when a checkout of the port's mlx_lm
    is given (MLX_LM_V4_PR1189 / MLX_LM_V4_PR1192: a folder holding its `mlx_lm` package, e.g.
    `git archive refs/pull/1189/head mlx_lm`; that head's deepseek_v4.py uses `Any` without importing
    it, add it to its typing import). The ports' models only take compress ratios 0, 4 and 128,
    hence the v4_flash fixture; their folders' DeepSeek-named variant is not theirs to load."""
    import os
    import subprocess
    import sys

    root = os.environ.get(f"MLX_LM_V4_{style.upper()}")
    if not root:
        pytest.skip(f"set MLX_LM_V4_{style.upper()} to a checkout of that port's mlx_lm")
    pub, _ = published("v4_flash")
    assert convert(pub, tmp_path / "out", "--dtype", "float32") == 0
    port = write_port(tmp_path / "out", tmp_path / style, style)
    script = ("import sys, mlx.core as mx; from mlx_lm.utils import load_model; "
              "m, _ = load_model(__import__('pathlib').Path(sys.argv[1]), strict=True); "
              "print(bool(mx.isfinite(m(mx.array([list(range(2, 40))]))).all()))")
    r = subprocess.run([sys.executable, "-c", script, str(port)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0 and r.stdout.strip().endswith("True"), r.stderr[-2000:]


def test_unknown_layout_is_named(tmp_path, capsys):
    from mlx_deepseek.layout import CheckpointError

    pub, _ = published()
    assert convert(pub, tmp_path / "out", "--dtype", "float32") == 0
    port = write_port(tmp_path / "out", tmp_path / "odd", "pr1189")
    tensors = read_st(port / "model.safetensors")
    tensors["model.layers.1.attn.wq_a.lora_A.weight"] = ("F32", np.zeros((4, 64), np.float32))
    write_st(port / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wq_a\.lora_A\.weight"):
        load_model(port)


# ---- bad input --------------------------------------------------------------------------------------

def edit_tensors(fn):
    def edit(folder):
        tensors = read_st(folder / "model.safetensors")
        fn(tensors)
        write_st(folder / "model.safetensors", tensors)
    return edit


def edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return edit


def _drop(*names):
    return edit_tensors(lambda t: [t.pop(n) for n in names])


def _set(name, dtype, array):
    return edit_tensors(lambda t: t.update({name: (dtype, array)}))


E = "layers.1.ffn.experts.3"


@pytest.mark.parametrize("edit,message", [
    (_drop("layers.1.attn.compressor.wkv.weight"), "layers.1.attn.compressor.wkv.weight"),
    (_drop("layers.2.attn.compressor.ape"), "layers.2.attn.compressor.ape"),
    (_drop("layers.1.attn.indexer.wq_b.weight", "layers.1.attn.indexer.wq_b.scale"), "layers.1.attn.indexer.wq_b"),
    (_drop("layers.0.ffn.gate.tid2eid"), "layers.0.ffn.gate.tid2eid"),
    (_drop(f"{E}.w1.weight", f"{E}.w1.scale"), "missing [3]"),
    (edit_config(compress_ratios=[0, 4, 16]), "compress_ratios has 3 entries"),
    # FP4 packed as [out, in/4] with matching scales: not two values per byte
    (edit_tensors(lambda t: t.update({f"{E}.w1.weight": ("I8", t[f"{E}.w1.weight"][1][:, :16].copy()),
                                      f"{E}.w1.scale": ("F8_E8M0", t[f"{E}.w1.scale"][1][:, :1].copy())})),
     f"{E}.w1.weight is FP4 packed as (32, 16); expected [out, in/2] = (32, 32)"),
    (_set(f"{E}.w1.weight", "I32", np.zeros((32, 8), np.int32)), f"{E}.w1.weight has a scale"),
    (_set(f"{E}.w1.weight", "I8", np.zeros((32, 64), np.uint8)), f"e8m0 scale {E}.w1.scale has shape (32, 2)"),
    (_set(f"{E}.w2.scale", "F8_E8M0", np.zeros((64, 2), np.uint8)), f"e8m0 scale {E}.w2.scale has shape (64, 2)"),
    (_set(f"{E}.w2.scale", "F32", np.zeros((64, 1), np.float32)), f"FP4 scale {E}.w2.scale has dtype F32"),
    (_set("layers.1.attn.wq_a.scale", "F8_E8M0", np.zeros((1, 4), np.uint8)), "layers.1.attn.wq_a.scale has shape (1, 4)"),
    (_drop("layers.1.attn.wkv.scale"), "FP8 tensor layers.1.attn.wkv.weight has no"),
])
def test_bad_input_is_named_and_nothing_is_written(edit, message, tmp_path, capsys):
    pub, _ = published()
    src = tmp_path / "src"
    shutil.copytree(pub, src)
    edit(src)
    assert convert(src, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_published_folder_loads_directly_and_equals_its_conversion(tmp_path):
    """load() of DeepSeek-V4 as published: the in-memory converter (FP4 experts carried, FP8 rest
    dequantized), value for value the folder that `python -m convert` writes with the same recipe;
    with quantize=8 as the default conversion."""
    from mlx_deepseek.layout import CheckpointError

    pub, _ = published()
    toks = mx.array([list(range(3, 60))])
    direct = load_model(pub)
    assert convert(pub, tmp_path / "float", "--recipe", "routed_experts=4:32:mxfp4") == 0
    assert mx.array_equal(direct(toks), load_model(tmp_path / "float")(toks)).item()
    assert convert(pub, tmp_path / "default") == 0
    assert mx.array_equal(load_model(pub, quantize=8)(toks), load_model(tmp_path / "default")(toks)).item()
    shutil.copytree(pub, tmp_path / "src")
    edit_config(quantization_config=None)(tmp_path / "src")
    with pytest.raises(CheckpointError, match="FP8/FP4 weights; convert the checkpoint first"):
        load_model(tmp_path / "src")


def test_expert_usage_is_refused_for_v4(tmp_path, capsys):
    pub, _ = published()
    (tmp_path / "usage.json").write_text("{}")
    assert convert(pub, tmp_path / "out", "--expert-usage", str(tmp_path / "usage.json")) == 1
    assert "not supported for deepseek_v4" in capsys.readouterr().err


# ---- sizes of a Flash-shaped conversion (from the config alone: nothing is read) --------------------

SIZES = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I64": 8}


def planned(config: dict, *flags):
    """(bytes as published, the plan's output bytes) for `python -m convert` with `flags`."""
    from convert.cli import parse_args
    from convert.plan_v4 import make_plan_v4, published_tensors
    from convert.recipes import V4_DEFAULT, Quant, Recipe
    from convert.sources import Source, TensorInfo
    from mlx_deepseek.models import args_from_config

    args = args_from_config(config)
    tensors = {n: TensorInfo(s, d, ROOT / "none", SIZES[d] * math.prod(s)) for n, (s, d) in published_tensors(args).items()}
    source = Source(ROOT, config, tensors, lambda name, rows=None: None)
    a = parse_args(["--hf-path", "x", "--mlx-path", "y", *flags])
    quant = a.quantize or a.q_bits
    recipe = Recipe(Quant(8, 64), V4_DEFAULT) if not quant else Recipe(Quant(a.q_bits or 4, 64), a.recipe)
    plan = make_plan_v4(source, args, recipe, mx.bfloat16, drop_mtp=a.drop_mtp)
    shipped = sum(t.nbytes for n, t in tensors.items() if not (a.drop_mtp and n.startswith("mtp.")))
    return shipped, plan.nbytes


def test_flash_shaped_sizes():
    """V4-Flash's published config: ~160 GB as shipped; ours by default (experts as shipped, the rest
    at 8 bits) and with -q --q-bits 2 (everything at 2 bits). Figures quoted in the README."""
    from conftest import SHARED

    flash = json.loads((SHARED / "configs" / "DeepSeek-V4-Flash.json").read_text())
    shipped, default = planned(flash)
    _, two_bits = planned(flash, "-q", "--q-bits", "2")
    _, mixed = planned(flash, "-q", "--q-bits", "2", "--recipe", "attention=8,shared_experts=8,embed=8,head=8")
    assert round(shipped / 1e9, 1) == 159.6
    assert round(default / 1e9, 1) == 158.7
    assert round(two_bits / 1e9, 1) == 91.1
    assert round(mixed / 1e9, 1) == 96.3
    # without the MTP block (2.3% of it): what parameter counts of the main model give
    shipped, default = planned(flash, "--drop-mtp")
    assert (round(shipped / 1e9, 1), round(default / 1e9, 1)) == (156.0, 155.1)


def test_conversion_memory_benchmark_runs(tmp_path, monkeypatch):
    """bench.convert_memory_v4 end to end at its smallest (one Flash-shaped layer + MTP), so it does not rot."""
    from bench import convert_memory_v4

    monkeypatch.setenv("MLX_DEEPSEEK_BENCH_RESULTS", str(tmp_path))
    assert convert_memory_v4.main(["--layers", "1", "--experts", "6", "--vocab", "1024"]) == 0
    rows = json.loads((tmp_path / "convert_memory_v4.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["peak_rss_gb"] > 0 and r["output_gb"] > 0 for r in rows)


def test_converted_folder_generates_like_its_source(tmp_path):
    """load() (model and tokenizer) on the converted folder; experts carried, the rest float32:
    greedy tokens equal those of the float reference. (v4_flash: transformers' config class, which
    the tokenizer loader reads, takes compress ratios 0, 4 and 128 only.)"""
    from mlx_deepseek import load
    from mlx_deepseek.generate import generate

    pub, ref = published("v4_flash")
    assert convert(pub, tmp_path / "out", "--dtype", "float32", "--recipe", "routed_experts=4:32:mxfp4") == 0
    model, tokenizer = load(tmp_path / "out")
    reference, _ = load(ref)
    prompt = [5, 17, 33, 2, 90, 41]
    text = generate(model, tokenizer, prompt, max_tokens=12)
    assert text and text == generate(reference, tokenizer, prompt, max_tokens=12)
