"""A model folder (Hugging Face or mlx-lm layout, local or on the hub) -> a ready `Model`.

Weights are read lazily from safetensors and mapped by `layout.to_model_layout`; every shard is
checked before anything is read (present, inside the folder, header intact), and the mapped
tensors are checked against the model (missing, unexpected, wrong shape) so errors name the
tensor and the file rather than surfacing as a crash deep inside MLX.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .models.config import ConfigError, ModelArgs
from .layout import CheckpointError, check_shapes, checkpoint_module_name, to_model_layout
from .layout_v4 import port_module_names, to_v4_layout
from .models import args_from_config, is_v4, model_class
from .models.moe import MixedPrecisionExperts, RoutedExperts

# The aliases under which mlx-lm's config.json may give a per-module quantization.
QUANT_ALIASES = {"key_up": ("kv_b_proj", "embed_q"), "value_up": ("kv_b_proj", "unembed_out")}


# The hidden folder a conversion writes into before renaming it (convert/writer.py: atomic_folder).
PARTIAL = re.compile(r"\..+\.partial-\d+")

MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]


def resolve_model_path(path_or_repo: str | os.PathLike, allow_patterns: list[str] = MODEL_FILES) -> Path:
    """A local folder as is; otherwise a Hugging Face repo id, downloaded (or found in the cache)."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a model folder, got a file")
        if PARTIAL.fullmatch(path.name):
            raise CheckpointError(f"{path}: an unfinished conversion (python -m convert was interrupted); "
                                  "run the conversion again")
        return path
    repo = str(path_or_repo)
    if repo.startswith((".", "/", "~")) or repo.count("/") != 1:
        raise CheckpointError(f"{repo}: no such folder (and not a Hugging Face repo id like 'org/name')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=allow_patterns))
    except Exception as e:  # network, auth, missing repo: all need the same advice
        raise CheckpointError(
            f"could not download {repo!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If you are offline, download it elsewhere and pass the local folder instead, "
            "e.g. --model /path/to/folder"
        ) from e


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    try:
        config = json.loads(file.read_bytes())
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, nesting too deep
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: a JSON {type(config).__name__}, expected an object")
    return config


def safetensors_header(file: Path) -> tuple[dict, int]:
    """Parse and check a safetensors header: every tensor's bytes must lie inside the file.

    Returns the header and where the data starts (tensor offsets count from there)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    except (struct.error, ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: not a valid safetensors file ({e})") from e
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not (info is None or isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise CheckpointError(f"{file}: __metadata__ must map names to strings")
            continue
        _check_entry(file, name, info, data_size)
    return header, 8 + n


# Bytes per element of each safetensors dtype.
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2,
               "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


def _check_entry(file: Path, name: str, info, data_size: int) -> None:
    """A header entry: a known dtype, a shape of non-negative integers, and offsets inside the data
    that hold exactly shape x itemsize bytes (so nothing reads past the file or allocates more)."""
    def integers(v, length=None):
        return isinstance(v, list) and (length is None or len(v) == length) and \
            all(type(x) is int and x >= 0 for x in v)

    if not isinstance(info, dict):
        raise CheckpointError(f"{file}: tensor {name}: header entry is not an object")
    if not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPE_SIZES:
        raise CheckpointError(f"{file}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not integers(shape):
        raise CheckpointError(f"{file}: tensor {name} has shape {shape!r}; expected a list of non-negative integers")
    if not integers(offsets, 2):
        raise CheckpointError(f"{file}: tensor {name} has data_offsets {offsets!r}; expected [start, end]")
    start, end = offsets
    if not start <= end <= data_size:
        raise CheckpointError(
            f"{file}: tensor {name} needs bytes {start}..{end} but the file holds {data_size} "
            "(truncated or corrupt download?)"
        )
    expected = DTYPE_SIZES[info["dtype"]]
    for d in shape:
        expected *= d
    if expected != end - start:
        raise CheckpointError(f"{file}: tensor {name} of shape {tuple(shape)} ({info['dtype']}) needs {expected} "
                              f"bytes, its data_offsets give {end - start} (corrupt header)")


def read_weight_map(index_file: Path) -> dict[str, Path]:
    """An index's `weight_map` (safetensors or .bin): tensor name -> its shard, each shard checked to
    be a file inside the index's folder."""
    try:
        index = json.loads(index_file.read_bytes())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("weight_map is not an object")
    except (OSError, ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_file}: not a valid index ({type(e).__name__}: {e})") from None
    folder, files, shards = index_file.parent, {}, {}
    root = folder.resolve()
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or not name or "\0" in name:
            raise CheckpointError(f"{index_file}: tensor {tensor} points to {name!r}, not a file name")
        if name not in shards:  # each shard checked once (V3's index names ~90k tensors, 163 shards)
            file = (folder / name).resolve()
            if root not in file.parents:
                raise CheckpointError(f"{index_file}: tensor {tensor} points to {name!r}, outside the model folder")
            if not file.is_file():
                raise CheckpointError(f"{index_file}: shard {file.name} is missing from {folder}")
            shards[name] = file
        files[tensor] = shards[name]
    return files


def weight_files(folder: Path) -> dict[Path, set[str]]:
    """The shards to read, each with the tensor names the index promises it holds."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        files: dict[Path, set[str]] = {}
        for tensor, file in read_weight_map(index_file).items():
            files.setdefault(file, set()).add(tensor)
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (PyTorch .bin weights: convert them with `python -m convert`)" if list(folder.glob("*.bin")) else ""
        raise CheckpointError(f"{folder}: no safetensors weights{hint}")
    return {f: set() for f in files}


def tensor_headers(folder: Path) -> dict[str, dict]:
    """Every tensor's header entry (dtype, shape, data_offsets) across the folder's shards."""
    entries = {}
    for file in weight_files(folder):
        header, _ = safetensors_header(file)
        entries.update((k, v) for k, v in header.items() if k != "__metadata__")
    return entries


def entry_nbytes(entry: dict) -> int:
    return entry["data_offsets"][1] - entry["data_offsets"][0]


def read_weights(folder: Path) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    for file, promised in weight_files(folder).items():
        header, _ = safetensors_header(file)
        absent = sorted(promised - header.keys())
        if absent:
            raise CheckpointError(f"{file}: the index says it holds {absent[:5]} but it does not")
        fp4 = [k for k, info in header.items() if isinstance(info, dict) and info.get("dtype") == "I8"
               and k.endswith(".weight") and k[: -len("weight")] + "scale" in header]
        if fp4:  # DeepSeek-V4 as published
            raise CheckpointError(f"{file}: FP8/FP4 weights; convert the checkpoint first: "
                                  f"python -m convert --hf-path {folder} ...")
        if any(info.get("dtype", "").startswith("F8") for info in header.values() if isinstance(info, dict)):
            raise CheckpointError(f"{file}: FP8 tensors, but config.json announces no FP8 quantization_config")
        weights.update(mx.load(str(file)))
    return weights


def is_block_fp8(config: dict) -> bool:
    q = config.get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "fp8" and "quantization" not in config


def only_torch_bin(folder: Path) -> bool:
    """PyTorch .bin weights and no safetensors: read through the converter's .bin reader."""
    return not (folder / "model.safetensors.index.json").is_file() and not list(folder.glob("*.safetensors")) \
        and bool(list(folder.glob("*.bin")))


def convert_on_load(folder: Path, config: dict, args: ModelArgs, quantize: Optional[int], group_size: int,
                    dtype: Optional[mx.Dtype], mtp: bool) -> tuple[dict, dict]:
    """(the config as the converter would write it, its output tensors) of a float or FP8 checkpoint,
    converted in memory tensor by tensor (convert/memory.py: the converter's own arithmetic)."""
    qc = config.get("quantization_config")
    if config.get("quantization") or (isinstance(qc, dict) and qc.get("bits")):
        raise CheckpointError(f"{folder}: already quantized; load it without quantize=")
    from convert.memory import convert_in_memory
    from convert.recipes import Quant, RecipeError

    quant = Quant(quantize, group_size) if quantize is not None else None
    try:
        weights, q = convert_in_memory(folder, config, args, quant, dtype, keep_mtp=mtp)
    except RecipeError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return ({**config, "quantization": q} if q else config), weights


QUANT_KEYS = {"group_size": (16, 32, 64, 128), "bits": (2, 3, 4, 5, 6, 8),
              "mode": ("affine", "mxfp4", "nvfp4", "mxfp8")}


def check_quantization(q) -> None:
    """mlx-lm's `quantization` block: defaults of known values, per-module entries false or objects."""
    def check(settings: dict, where: str, required: bool) -> None:
        for key, allowed in QUANT_KEYS.items():
            if (required and key != "mode") or key in settings:
                if settings.get(key) not in allowed or type(settings.get(key)) is bool:
                    raise CheckpointError(f"config.json: quantization {where}{key}={settings.get(key)!r} "
                                          f"is not valid: expected one of {list(allowed)}")
        bits = settings.get("expert_bits")
        if bits is not None and not (isinstance(bits, list) and all(b in QUANT_KEYS["bits"] for b in bits)):
            raise CheckpointError(f"config.json: quantization {where}expert_bits={bits!r} is not valid")

    if not isinstance(q, dict):
        raise CheckpointError(f"config.json: quantization={q!r} is not valid: expected an object")
    check(q, "", required=True)
    for module, settings in q.items():
        if module not in QUANT_KEYS and module != "quant_method":
            if settings is False or settings is None:
                continue
            if not isinstance(settings, dict):
                raise CheckpointError(f"config.json: quantization of {module}={settings!r} is not valid: "
                                      "expected an object or false")
            check(settings, f"of {module}: ", required=False)


def quantization_of(config: dict, args: ModelArgs):
    """mlx-lm's `quantization` block -> (defaults or None, per-module params lookup)."""
    q = config.get("quantization")
    if q is None:
        qc = config.get("quantization_config")
        if qc and isinstance(qc, dict) and "bits" not in qc:
            method = qc.get("quant_method", "unknown")
            raise CheckpointError(
                f"config.json: quantization_config ({method}) is a Hugging Face format; "
                "convert the checkpoint first with `python -m convert`"
            )
        q = qc
    if not q:
        return None, lambda path: None
    check_quantization(q)
    defaults = {"group_size": q["group_size"], "bits": q["bits"], "mode": q.get("mode", "affine")}

    def params(path: str):
        path = checkpoint_module_name(path, args)
        stem, _, leaf = path.rpartition(".")
        aliases = port_module_names(path) if is_v4(args) else [f"{stem}.{a}" for a in QUANT_ALIASES.get(leaf, ())]
        for alias in [path] + aliases:
            if alias in q:
                return q[alias] and {**defaults, **q[alias]}
        return defaults

    return defaults, params


def load_model(path_or_repo, lazy: bool = False, dtype: Optional[mx.Dtype] = None, mtp: bool = False,
               quantize: Optional[int] = None, group_size: int = 64, expert_memory_gb: Optional[float] = None,
               expert_policy: str = "lfu"):
    """Build the model of a folder. `dtype` casts floating weights (routing tensors stay float32).

    `mtp=True` also loads the multi-token-prediction layer (an error if the checkpoint has none).
    `quantize=BITS` quantizes a float or block-FP8 checkpoint as it loads (affine, `group_size`),
    exactly as `python -m convert -q --q-bits BITS` would; block-FP8 loads without it too.
    `expert_memory_gb=N`: the routed experts stay in the folder and are read on demand into N GB of
    expert slots (`experts_on_disk`; `expert_policy` "lfu", the measured best, or "lru"); `model.expert_stream.stats`
    counts hits and bytes read. A budget that holds every expert loads them as usual.
    """
    folder = resolve_model_path(path_or_repo)
    args, defaults, quant_params, weights = read_model_folder(folder, mtp, quantize, group_size, dtype)
    model = model_class(args)(args, mtp=mtp)
    stream = None
    if expert_memory_gb is not None:
        stream = _stream_experts(model, folder, weights, args, expert_memory_gb, expert_policy, quant_params,
                                 dtype, quantize)
    install_weights(model, {k: cast_weight(k, v, dtype) for k, v in weights.items()}, defaults, quant_params, folder)
    if stream is not None:
        model.expert_stream = stream
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model


def _stream_experts(model, folder: Path, weights: dict, args, budget_gb: float, policy: str, quant_params,
                    dtype, quantize):
    from .experts_on_disk import stream_experts

    if not budget_gb > 0:
        raise ValueError(f"expert_memory_gb={budget_gb!r}: expected a positive number of GB")
    if quantize is not None or is_block_fp8(read_config(folder)) or only_torch_bin(folder):
        raise CheckpointError(f"{folder}: expert_memory_gb streams experts as stored, so it needs a converted "
                              "(or float safetensors) folder: python -m convert --hf-path ... --mlx-path ... -q")
    try:
        return stream_experts(model, folder, weights, budget_gb, quant_params, lambda k, v: cast_weight(k, v, dtype),
                              policy)
    except CheckpointError as e:
        raise CheckpointError(f"{folder}: {e}" if str(folder) not in str(e) else str(e)) from None


def read_model_folder(folder: Path, mtp: bool = False, quantize: Optional[int] = None, group_size: int = 64,
                      dtype: Optional[mx.Dtype] = None):
    """(args, quantization defaults, per-module quantization lookup, tensors in our module layout)
    of a local folder, read lazily; with `mtp`, the MTP layer too (its shared copies checked).
    Block-FP8 checkpoints, and any float one with `quantize`, go through the converter in memory."""
    config = read_config(folder)
    try:
        args = args_from_config(config)
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from None
    if quantize is not None or is_block_fp8(config) or only_torch_bin(folder):
        config, raw = convert_on_load(folder, config, args, quantize, group_size, dtype, mtp)
    else:
        raw = read_weights(folder)
    defaults, quant_params = quantization_of(config, args)
    if is_v4(args):
        weights = to_v4_layout(raw, args, keep_mtp=mtp)
        if mtp and not any(k.startswith("mtp.") for k in weights):
            raise CheckpointError(f"{folder}: no multi-token-prediction block (mtp.0.*) in this checkpoint; "
                                  "run without MTP")
        return args, defaults, quant_params, weights
    try:
        weights = to_model_layout(raw, args, quant_params, keep_mtp=mtp)
    except CheckpointError as e:  # layout errors name the tensor; say which folder too
        raise CheckpointError(f"{folder}: {e}") from None
    if mtp:
        share_mtp_copies(weights, folder, args)
    return args, defaults, quant_params, weights


def install_weights(module: nn.Module, weights: dict, defaults, quant_params, where,
                    checkpoint_path=lambda p: p) -> None:
    """Quantize the modules whose weights come quantized, check every shape, load.
    `checkpoint_path` maps a module path of `module` to the model's (for per-module settings)."""
    if "mtp" in module and hasattr(module.mtp, "own_copies"):  # V3's MTP layer: its stored embedding / head,
        # where they differ from the main ones (V4's MTP block uses the main ones)
        module.mtp.own_copies("mtp.embed_tokens.weight" in weights, "mtp.lm_head.weight" in weights)
    if defaults is not None:
        _mix_expert_precision(module, quant_params, checkpoint_path)
        nn.quantize(
            module,
            class_predicate=lambda p, m: hasattr(m, "to_quantized")
            and f"{p}.scales" in weights
            and quant_params(checkpoint_path(p)),
            **defaults,
        )
    check_shapes(module, weights, where)
    module.load_weights(list(weights.items()), strict=True)


def _mix_expert_precision(module: nn.Module, quant_params, checkpoint_path) -> None:
    """Routed experts that the config quantizes per expert (`expert_bits`) become one stack per width."""
    swaps = []
    for path, m in module.named_modules():
        spec = isinstance(m, RoutedExperts) and quant_params(checkpoint_path(path))
        if spec and "expert_bits" in spec:
            experts, hidden, dims = m.gate_proj.weight.shape
            if len(spec["expert_bits"]) != experts:
                raise CheckpointError(f"config.json: quantization of {checkpoint_path(path)} gives bits for "
                                      f"{len(spec['expert_bits'])} experts, the model has {experts}")
            swaps.append((path, MixedPrecisionExperts(dims, hidden, spec["expert_bits"])))
    if swaps:
        module.update_modules(tree_unflatten(swaps))


def share_mtp_copies(weights: dict, folder: Path, args: ModelArgs) -> None:
    """The MTP layer's stored embedding and head: dropped where they equal the main ones (which it
    then shares: ~1 GB less on R1), kept as its own where a fine-tune trained them apart."""
    layer = f"model.layers.{args.num_hidden_layers}"
    if not any(k.startswith("mtp.") for k in weights):
        raise CheckpointError(
            f"{folder}: no multi-token-prediction layer ({layer}.*) in this checkpoint "
            f"(num_nextn_predict_layers={args.num_nextn_predict_layers}); run without MTP"
        )
    head = "model.embed_tokens" if args.tie_word_embeddings else "lm_head"
    for copy, main in (("mtp.embed_tokens", "model.embed_tokens"), ("mtp.lm_head", head)):
        parts = [k for k in weights if k.startswith(copy + ".")]
        same_parts = {k[len(copy):] for k in parts} == {k[len(main):] for k in weights if k.startswith(main + ".")}
        if parts and same_parts and all(_equal(weights[k], weights.get(main + k[len(copy):])) for k in parts):
            for k in parts:
                del weights[k]


def _equal(a: mx.array, b: Optional[mx.array]) -> bool:
    return b is not None and a.shape == b.shape and a.dtype == b.dtype and mx.array_equal(a, b).item()


# Routing decides on float32 scores (as the reference does): its small tensors are kept in float32.
FLOAT32_TENSORS = ("mlp.gate.weight", "e_score_correction_bias",
                   # DeepSeek-V4: its router, and the hyper-connection, sink and window-bias tensors
                   "ffn.gate.weight", "ffn.gate.bias", ".fn", ".base", ".scale", "attn_sink", ".ape",
                   # DeepSeek-V3.2's indexer: its head weights and key norm (transformers keeps them so too)
                   "self_attn.indexer.weights_proj.weight", "self_attn.indexer.k_norm.weight",
                   "self_attn.indexer.k_norm.bias")


def cast_weight(name: str, value: mx.array, dtype: Optional[mx.Dtype]) -> mx.array:
    if name.endswith(FLOAT32_TENSORS) and mx.issubdtype(value.dtype, mx.floating):  # (quantized as stored: kept)
        return value.astype(mx.float32)
    if dtype is not None and mx.issubdtype(value.dtype, mx.floating):
        return value.astype(dtype)
    return value


def load(path_or_repo, lazy: bool = False, dtype: Optional[mx.Dtype] = None, mtp: bool = False,
         quantize: Optional[int] = None, group_size: int = 64, expert_memory_gb: Optional[float] = None,
         expert_policy: str = "lfu"):
    """(model, tokenizer); the tokenizer is mlx-lm's TokenizerWrapper with its streaming detokenizer.
    `quantize=BITS`: quantize on load; `expert_memory_gb=N`: routed experts streamed from disk (see `load_model`)."""
    folder = resolve_model_path(path_or_repo)
    model = load_model(folder, lazy=lazy, dtype=dtype, mtp=mtp, quantize=quantize, group_size=group_size,
                       expert_memory_gb=expert_memory_gb, expert_policy=expert_policy)
    return model, load_tokenizer(folder)


def load_tokenizer(folder: Path):
    """mlx-lm's tokenizer of a model folder, stopping at the config's end-of-sequence token(s)."""
    from mlx_lm.utils import load_tokenizer as mlx_lm_load_tokenizer

    eos = read_config(folder).get("eos_token_id")
    eos = [eos] if type(eos) is int else eos
    if eos is not None and not (isinstance(eos, list) and all(type(e) is int and e >= 0 for e in eos)):
        raise CheckpointError(f"{folder / 'config.json'}: eos_token_id={eos!r} is not valid: "
                              "expected a token id or a list of them")
    try:
        return mlx_lm_load_tokenizer(folder, eos_token_ids=eos)
    except Exception as e:  # transformers / tokenizers parse these files; any failure is a bad file
        raise CheckpointError(f"{folder}: the tokenizer files could not be read ({type(e).__name__}: {e})") from None
