"""Property-based fuzzing (hypothesis) of every parser of outside input.

Property, for each: the result is a correct load, or our own error type naming the file; never
another exception, a hang (each example runs under an alarm) or an allocation of absurd size (the
process's peak RSS may not grow by more than 512 MB over an example). Examples are derandomized
(the same every run) and their number is fixed, so the whole file runs in well under a minute and a
half on 2 cores. Inputs that found bugs are kept as explicit regression cases (`@example`).
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chat  # noqa: E402

from convert.expert_bits import read_usage  # noqa: E402
from convert.recipes import KINDS, MODES, Quant, Recipe, RecipeError  # noqa: E402
from convert.sources import open_source  # noqa: E402
from mlx_deepseek import CheckpointError, ConfigError, load_model  # noqa: E402
from mlx_deepseek.generate import CacheFileError, PromptCache, cache_checksum  # noqa: E402
from mlx_deepseek.loading import load_tokenizer, read_config, read_weights, safetensors_header, weight_files  # noqa: E402
from mlx_deepseek.models.config import ModelArgs  # noqa: E402

OURS = (CheckpointError, ConfigError, CacheFileError, RecipeError)
COUNTS = {}  # test name -> examples run, for the README


def fuzz(n):
    """hypothesis settings: n examples, derandomized, no example database, no deadline (2 busy cores)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


class Hang(Exception):
    pass


@contextmanager
def bounded(seconds: int = 20, megabytes: int = 512):
    def alarm(*_):
        raise Hang(f"no answer in {seconds} s")

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown < megabytes, f"peak memory grew by {grown:.0f} MB"


def outcome(fn, *files, errors=OURS):
    """fn()'s result, or None when it raised one of our errors naming (one of) `files`; anything else fails."""
    with bounded():
        try:
            return fn()
        except errors as e:
            names = [Path(f).name for f in files]
            assert any(n in str(e) for n in names), f"{type(e).__name__} names none of {names}: {e}"
            return None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def json_bytes(value) -> bytes:
    return json.dumps(value).encode()


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-"))


# ---------------------------------------------------------------------------------------- safetensors
def valid_safetensors() -> bytes:
    folder = scratch()
    mx.save_safetensors(str(folder / "x.safetensors"), {
        "a": mx.arange(6, dtype=mx.float32).reshape(2, 3), "b": mx.ones((4,), dtype=mx.bfloat16),
        "c": mx.zeros((0, 2), dtype=mx.float16), "d": mx.array([1, 2], dtype=mx.int32)})
    return (folder / "x.safetensors").read_bytes()


VALID_ST = valid_safetensors()


def read_back(folder: Path, file: Path):
    """Our loader and the converter's reader on a folder holding one fuzzed shard."""
    header = outcome(lambda: safetensors_header(file)[0], file)
    weights = outcome(lambda: read_weights(folder), file)
    if weights is not None:
        assert header is not None
        for name, array in weights.items():
            mx.eval(array)
            assert list(array.shape) == header[name]["shape"]
    source = outcome(lambda: open_source(folder, {}), file)
    if source is not None:
        for name in source.names():
            assert list(source.read(name).shape) == header[name]["shape"]


def mutated(valid: bytes, edits, cut) -> bytes:
    """`valid` with bytes overwritten at positions (mod its length), then cut at `cut` (mod its length + 1)."""
    data = bytearray(valid)
    for pos, byte in edits:
        data[pos % len(data)] = byte
    return bytes(data if cut is None else data[: cut % (len(data) + 1)])


@fuzz(300)
@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       st.none() | st.integers(0, 10**6))
@example(edits=[(0, 255), (7, 127)], cut=None)  # a header length of ~2^63
@example(edits=[(181, 32)], cut=None)  # found: a mangled "shape" key reached mx.load (RuntimeError)
def test_mutated_safetensors(edits, cut):
    COUNTS["safetensors files, mutated bytes"] = COUNTS.get("safetensors files, mutated bytes", 0) + 1
    data = mutated(VALID_ST, edits, cut)
    folder = scratch()
    (folder / "model.safetensors").write_bytes(data)
    read_back(folder, folder / "model.safetensors")


ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "U8", "F8_E4M3", "F64", "X9"]) | JSON,
    "shape": st.lists(st.integers(-3, 2**40) | st.sampled_from([0, 1, 2, 3]), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(-5, 2**64) | st.integers(0, 64), min_size=0, max_size=3) | JSON,
})


@fuzz(250)
@given(st.dictionaries(st.text(max_size=5), ENTRY | JSON, max_size=3) | JSON, st.integers(0, 96),
       st.none() | st.integers(0, 2**64 - 1))
@example(header={"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}, data=8, length=None)
@example(header={"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, data=8, length=None)
@example(header={"t": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}}, data=8, length=None)
@example(header=[1, 2], data=0, length=None)
@example(header={"": {"dtype": [], "shape": [], "data_offsets": []}}, data=0, length=None)  # found: TypeError
@example(header={"t": 5}, data=0, length=None)
def test_crafted_safetensors_headers(header, data, length):
    COUNTS["safetensors headers, crafted"] = COUNTS.get("safetensors headers, crafted", 0) + 1
    raw = json_bytes(header)
    blob = (len(raw) if length is None else length).to_bytes(8, "little") + raw + bytes(range(data))
    folder = scratch()
    (folder / "model.safetensors").write_bytes(blob)
    read_back(folder, folder / "model.safetensors")


# ---------------------------------------------------------------------------------------- PyTorch .bin
def valid_bins() -> dict[bool, bytes]:
    import io

    import torch

    out = {}
    for zip_format in (True, False):
        buffer = io.BytesIO()
        torch.save({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, buffer,
                   _use_new_zipfile_serialization=zip_format)
        out[zip_format] = buffer.getvalue()
    return out


VALID_BINS = valid_bins()


@fuzz(200)
@given(st.booleans(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=3),
       st.none() | st.integers(0, 10**6))
def test_mutated_pytorch_bin(zip_format, edits, cut):
    COUNTS["PyTorch .bin, mutated bytes (zip and legacy)"] = COUNTS.get(
        "PyTorch .bin, mutated bytes (zip and legacy)", 0) + 1
    data = mutated(VALID_BINS[zip_format], edits, cut)
    folder = scratch()
    (folder / "pytorch_model.bin").write_bytes(data)
    source = outcome(lambda: open_source(folder, {}), "pytorch_model.bin")
    if source is not None:
        for name in source.names():
            assert tuple(source.read(name).shape) == source.tensors[name].shape


# ---------------------------------------------------------------------------------------- index
SHARD_NAMES = st.sampled_from(["model.safetensors", "missing.safetensors", "../x.safetensors", "/etc/passwd",
                               "", ".", "a\x00b", "sub/../model.safetensors"]) | st.text(max_size=8) | JSON


@fuzz(150)
@given(st.fixed_dictionaries({"weight_map": st.dictionaries(st.sampled_from(["a", "b", "zz"]) | st.text(max_size=4),
                                                            SHARD_NAMES, max_size=3) | JSON}) | JSON)
@example(index={"weight_map": {"a": "a\x00b"}})
@example(index={"weight_map": {"a": 3}})
@example(index={"weight_map": [1]})
@example(index=[])
def test_index_files(index):
    COUNTS["model.safetensors.index.json"] = COUNTS.get("model.safetensors.index.json", 0) + 1
    folder = scratch()
    (folder / "model.safetensors").write_bytes(VALID_ST)
    (folder / "model.safetensors.index.json").write_bytes(json_bytes(index))
    index_file = folder / "model.safetensors.index.json"
    files = outcome(lambda: weight_files(folder), index_file)
    if files is not None:
        assert all(f.is_file() and folder.resolve() in f.parents for f in files)
        outcome(lambda: read_weights(folder), index_file, "model.safetensors")


@fuzz(40)
@given(st.binary(max_size=64))
@example(raw=b"\xff\xfe{")
def test_index_file_bytes(raw):
    COUNTS["model.safetensors.index.json"] = COUNTS.get("model.safetensors.index.json", 0) + 1
    folder = scratch()
    (folder / "model.safetensors").write_bytes(VALID_ST)
    (folder / "model.safetensors.index.json").write_bytes(raw)
    outcome(lambda: weight_files(folder), "model.safetensors.index.json")


# ---------------------------------------------------------------------------------------- config.json
@pytest.fixture(scope="module")
def tiny(checkpoint):
    folder = checkpoint("v3")
    return folder, json.loads((folder / "config.json").read_text())


FIELDS = sorted(list(ModelArgs.__dataclass_fields__) + ["rope_parameters", "quantization", "quantization_config"])
CONFIG_EDITS = st.lists(st.tuples(st.sampled_from(FIELDS) | st.text(max_size=5), st.none() | JSON
                                  | st.integers(-3, 2**40) | st.sampled_from([0, 1, 2, 3, 16, 2**31])), max_size=3)
RAW_CONFIG_EDITS = st.lists(st.tuples(st.sampled_from(FIELDS), st.just("DELETE")), max_size=2)


def edited(config: dict, edits) -> dict:
    config = json.loads(json.dumps(config))
    for key, value in edits:
        if value == "DELETE":
            config.pop(key, None)
        else:
            config[key] = value
    return config


@fuzz(250)
@given(CONFIG_EDITS, RAW_CONFIG_EDITS)
@example(edits=[("rope_scaling", {"type": "yarn", "factor": 0, "original_max_position_embeddings": 32})], deletes=[])
@example(edits=[("rope_scaling", [1])], deletes=[])
@example(edits=[("first_k_dense_replace", "1")], deletes=[])
@example(edits=[("rms_norm_eps", "x")], deletes=[])
@example(edits=[("n_routed_experts", 2**40)], deletes=[])
@example(edits=[("model_type", [])], deletes=[])  # found: TypeError (unhashable)
def test_config_fields(tiny, edits, deletes):
    COUNTS["config.json fields"] = COUNTS.get("config.json fields", 0) + 1
    config = edited(tiny[1], edits + deletes)
    with bounded():
        try:
            args = ModelArgs.from_dict(config)
        except ConfigError as e:
            assert "config.json" in str(e)
            return
    for name, f in ModelArgs.__dataclass_fields__.items():
        value = getattr(args, name)
        assert value is None or isinstance(value, (int, float, str, dict)), (name, value)


@fuzz(30)
@given(CONFIG_EDITS, RAW_CONFIG_EDITS)
@example(edits=[("rope_scaling", {"type": "yarn", "factor": -1.0, "original_max_position_embeddings": 0})], deletes=[])
@example(edits=[("quantization", {"bits": 4})], deletes=[])  # found: KeyError
@example(edits=[("quantization", [])], deletes=[])
@example(edits=[("qk_nope_head_dim", 1)], deletes=[])  # found: a layout error that did not name the folder
def test_config_then_a_whole_load(tiny, edits, deletes):
    """A fuzzed config.json beside real weights: an error naming the folder, or a model that runs."""
    COUNTS["config.json, then a whole load and forward pass"] = COUNTS.get(
        "config.json, then a whole load and forward pass", 0) + 1
    folder = scratch() / "fuzzmodel"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(tiny[0] / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(edited(tiny[1], edits + deletes)))
    model = outcome(lambda: load_model(folder), folder, "config.json")
    if model is not None:
        with bounded():
            mx.eval(model(mx.array([[1, 2, 3]])))


@fuzz(40)
@given(st.binary(max_size=48))
@example(raw=b"\xff")
@example(raw=b"[1]")
def test_config_bytes(tiny, raw):
    COUNTS["config.json bytes"] = COUNTS.get("config.json bytes", 0) + 1
    folder = scratch()
    (folder / "config.json").write_bytes(raw)
    config = outcome(lambda: read_config(folder), folder / "config.json")
    if config is not None:
        outcome(lambda: ModelArgs.from_dict(config), "config.json")


# ---------------------------------------------------------------------------------------- tokenizer / generation
TOKENIZER_KEYS = ["eos_token", "bos_token", "chat_template", "tokenizer_class", "model_max_length",
                  "added_tokens_decoder", "unk_token"]


@fuzz(25)
@given(st.lists(st.tuples(st.sampled_from(TOKENIZER_KEYS), JSON), max_size=2), st.none() | JSON)
@example(edits=[("tokenizer_class", "NoSuchTokenizer")], eos=None)
@example(edits=[], eos="x")
def test_tokenizer_files(tiny, edits, eos):
    COUNTS["tokenizer_config.json / eos_token_id"] = COUNTS.get("tokenizer_config.json / eos_token_id", 0) + 1
    folder = scratch() / "fuzzmodel"
    folder.mkdir()
    (folder / "tokenizer.json").symlink_to(tiny[0] / "tokenizer.json")
    config = json.loads((tiny[0] / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(edited(config, edits)))
    (folder / "config.json").write_text(json.dumps({**tiny[1], "eos_token_id": eos}))
    tokenizer = outcome(lambda: load_tokenizer(folder), folder)
    if tokenizer is not None:
        with bounded():
            assert tokenizer.decode(tokenizer.encode("hello")).endswith("hello")


@fuzz(150)
@given(st.dictionaries(st.sampled_from(["temperature", "top_p", "do_sample", "top_k"]) | st.text(max_size=4),
                       JSON, max_size=3) | JSON | st.binary(max_size=16))
@example(config={"temperature": "hot"})
@example(config=[])
@example(config=b"\xff")
def test_generation_config(config):
    COUNTS["generation_config.json"] = COUNTS.get("generation_config.json", 0) + 1
    folder = scratch()
    (folder / "generation_config.json").write_bytes(config if isinstance(config, bytes) else json_bytes(config))
    defaults = outcome(lambda: chat.sampling_defaults(folder), "generation_config.json")
    if defaults is not None:
        assert all(isinstance(v, float) and v >= 0 and v == v for v in defaults.values()), defaults


# ---------------------------------------------------------------------------------------- cache files
@pytest.fixture(scope="module")
def saved_cache(tiny):
    model = load_model(tiny[0])
    cache = PromptCache(model)
    cache(list(range(1, 12)))
    file = scratch() / "saved.safetensors"
    cache.save(file, extra={"messages": [{"role": "user", "content": "hi"}]})
    return model, file.read_bytes()


def state_of(cache: PromptCache):
    return list(cache.tokens), [[np.array(a) for a in c.state] for c in cache.cache]


def same_state(a, b) -> bool:
    return a[0] == b[0] and all(len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y))
                                for x, y in zip(a[1], b[1]))


@fuzz(150)
@given(st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 7)), min_size=1, max_size=3),
       st.none() | st.integers(0, 10**7))
@example(flips=[(9000, 0)], cut=None)
def test_mutated_cache_files_are_refused_and_the_conversation_is_untouched(saved_cache, flips, cut):
    COUNTS["cache files, flipped bits / truncated"] = COUNTS.get("cache files, flipped bits / truncated", 0) + 1
    model, good = saved_cache
    data = bytearray(good)
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    if cut is not None:
        data = data[: cut % len(data)]
    file = scratch() / "c.safetensors"
    file.write_bytes(bytes(data))
    cache = PromptCache(model)
    cache([5, 6, 7])
    before = state_of(cache)
    loaded = outcome(lambda: cache.load(file), file)
    if loaded is None:
        assert same_state(state_of(cache), before)
    else:  # only a mutation that changed nothing that matters may load, and then exactly as saved
        reference = PromptCache(model)
        reference.load(write(good))
        assert same_state(state_of(cache), state_of(reference))


@fuzz(120)
@given(st.dictionaries(st.sampled_from(["format", "model", "caches", "extra", "checksum"]),
                       st.text(max_size=12) | JSON.map(json.dumps), max_size=5),
       st.dictionaries(st.sampled_from(["tokens", "layer.0.0", "layer.0.1", "layer.1.0", "draft.0", "x"]),
                       st.sampled_from([(0,), (3,), (1, 1, 3, 4), (2, 2), (1, 1, 3, 32), (1, 1, 3, 16)]), max_size=4),
       st.booleans(), st.booleans())
@example(meta={"caches": "[1]"}, arrays={}, keep_model=True, sign=True)
@example(meta={"caches": '{"layer.0": "x,y"}'}, arrays={}, keep_model=True, sign=True)
@example(meta={"caches": '{"layer.0": "", "layer.1": "", "layer.2": ""}'}, arrays={"tokens": (3,), "layer.0.0": (1, 1, 3, 4)},
         keep_model=True, sign=True)
@example(meta={"caches": '{"layer.0": "", "layer.1": "", "layer.2": ""}'}, keep_model=True, sign=True,
         arrays={"tokens": (3,), **{f"layer.{i}.{j}": (1, 1, 3, (32, 16)[j]) for i in range(3) for j in range(2)}})
def test_crafted_cache_files(saved_cache, meta, arrays, keep_model, sign):
    """Files written as an attacker would, with a valid checksum when `sign`: the structure is checked too."""
    COUNTS["cache files, crafted metadata and arrays"] = COUNTS.get("cache files, crafted metadata and arrays", 0) + 1
    model, good = saved_cache
    _, real = mx.load(str(write(good)), return_metadata=True)
    if keep_model:
        meta = {**real, **meta}
    file = scratch() / "crafted.safetensors"
    arrays = {k: mx.zeros(s, dtype=mx.int32 if k == "tokens" else mx.float32) for k, s in arrays.items()}
    if sign:
        meta = {**meta, "checksum": cache_checksum(arrays, meta)}
    mx.save_safetensors(str(file), arrays, metadata=meta)
    cache = PromptCache(model)
    cache([5, 6, 7])
    before = state_of(cache)
    if outcome(lambda: cache.load(file), file) is None:
        assert same_state(state_of(cache), before)
    else:  # a well-formed cache of this model's shapes: the conversation goes on from it
        with bounded():
            mx.eval(cache([1]))


def write(data: bytes) -> Path:
    file = scratch() / "x.safetensors"
    file.write_bytes(data)
    return file


# ---------------------------------------------------------------------------------------- usage files
def usage_args():
    return ModelArgs.from_dict(dict(model_type="deepseek_v3", vocab_size=10, hidden_size=8, intermediate_size=8,
                                    num_hidden_layers=2, num_attention_heads=1, kv_lora_rank=4, qk_nope_head_dim=2,
                                    qk_rope_head_dim=2, v_head_dim=2, moe_intermediate_size=4, n_routed_experts=4,
                                    n_group=1, topk_group=1, num_experts_per_tok=2))


VALID_USAGE = {"format": "mlx-deepseek expert usage v1", "counts": {
    "model.layers.0.mlp.switch_mlp": [1, 2, 3, 4], "model.layers.1.mlp.switch_mlp": [0, 0, 9, 1]}}


@fuzz(150)
@given(st.lists(st.tuples(st.sampled_from(["format", "counts", "x"]), JSON), max_size=2),
       st.lists(st.tuples(st.sampled_from(list(VALID_USAGE["counts"]) + ["model.layers.5.mlp.switch_mlp"]),
                          st.lists(st.integers(-2, 2**70) | JSON, max_size=5) | JSON), max_size=2),
       st.booleans())
@example(top=[("counts", [1, 2])], layers=[], as_list=False)
@example(top=[], layers=[("model.layers.0.mlp.switch_mlp", 5)], as_list=False)
@example(top=[], layers=[("model.layers.0.mlp.switch_mlp", [True, False, True, True])], as_list=False)
def test_usage_files(top, layers, as_list):
    COUNTS["expert-usage files"] = COUNTS.get("expert-usage files", 0) + 1
    usage = json.loads(json.dumps(VALID_USAGE))
    for k, v in top:
        usage[k] = v
    for layer, counts in layers:
        if isinstance(usage.get("counts"), dict):
            usage["counts"][layer] = counts
    file = scratch() / "usage.json"
    file.write_text(json.dumps([usage] if as_list else usage))
    result = outcome(lambda: read_usage(file, usage_args()), file)
    if result is not None:
        for counts in result["counts"].values():
            assert len(counts) == 4 and all(type(c) is int and c >= 0 for c in counts)


# ---------------------------------------------------------------------------------------- recipes
RULE = st.tuples(st.sampled_from(list(KINDS) + ["experts", ""]) | st.text(max_size=4),
                 st.sampled_from(["", "="]),
                 st.lists(st.sampled_from(["2", "3", "4", "8", "7", "64", "32", "16", "none", "mxfp4", "nvfp4",
                                           "mxfp8", "affine", "foo", "", "-1", "1e9"]) | st.text(max_size=3),
                          max_size=4))


@fuzz(300)
@given(st.lists(RULE, max_size=4).map(lambda rules: ",".join(k + eq + ":".join(v) for k, eq, v in rules))
       | st.text(max_size=20), st.sampled_from([None, Quant(4, 64), Quant(4, 32, "mxfp4")]))
@example(spec="attention=4:64:foo", default=None)
@example(spec="attention=4:32:mxfp4", default=None)
def test_recipes(spec, default):
    COUNTS["recipes"] = COUNTS.get("recipes", 0) + 1
    with bounded():
        try:
            recipe = Recipe(default, spec)
        except RecipeError as e:
            assert "--recipe" in str(e)
            return
    for module in ["model.embed_tokens", "lm_head", "model.layers.1.self_attn.q_a_proj",
                   "model.layers.1.mlp.switch_mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.3.eh_proj",
                   "model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.gate"]:
        q = recipe(module)
        assert q is None or (q.mode in MODES and q.bits in MODES[q.mode][1]), (module, q)


def test_zz_fuzz_counts():
    """Prints the examples each fuzzer ran (the README's bad-input matrix quotes them)."""
    print("\n" + "\n".join(f"{name}: {n}" for name, n in COUNTS.items()))
