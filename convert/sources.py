"""Reading a source checkpoint one tensor at a time: safetensors (lazily, via mx.load) or PyTorch
.bin (memory-mapped, `weights_only=True`: pickled code is never executed). Block-FP8 weights are
dequantized as they are read (see fp8.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from mlx_deepseek.layout import CheckpointError
from mlx_deepseek.loading import read_weight_map, safetensors_header, weight_files

from . import fp8

TORCH_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                "torch.float8_e4m3fn": "F8_E4M3", "torch.int64": "I64", "torch.int32": "I32"}
FLOAT_DTYPES = {"F32", "F16", "BF16", "F8_E4M3"}


@dataclass
class TensorInfo:
    shape: tuple
    dtype: str            # safetensors notation: F32, BF16, F8_E4M3, ...
    file: Path
    nbytes: int
    offset: int = 0       # where its bytes start in `file` (safetensors)


class Source:
    """Name -> shape/dtype of every tensor, and `read(name)` -> mx.array, dequantizing FP8."""

    def __init__(self, folder: Path, config: dict, tensors: dict[str, TensorInfo], reader: Callable[[str], mx.array]):
        self.folder, self.config, self.tensors, self._read = folder, config, tensors, reader
        self.fp8_block = fp8.block_size(config, folder)
        self.fp8_scales = fp8.check_scales(tensors, self.fp8_block) if self.fp8_block else {}
        for name, info in tensors.items():
            if info.dtype not in FLOAT_DTYPES and name not in self.fp8_scales.values():
                raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}; expected a float type")
            if info.dtype == "F8_E4M3" and name not in self.fp8_scales:
                raise CheckpointError(f"{info.file}: tensor {name} is FP8 but config.json announces no FP8 quantization")

    def names(self) -> list[str]:
        """Tensor names, without the FP8 scales (they are folded into their weights on read)."""
        scales = set(self.fp8_scales.values())
        return [n for n in self.tensors if n not in scales]

    def read(self, name: str) -> mx.array:
        if name in self.fp8_scales:
            return fp8.dequantize(self._read(name), self._read(self.fp8_scales[name]), self.fp8_block)
        return self._read(name)


def open_source(folder: Path, config: dict) -> Source:
    if (folder / "model.safetensors.index.json").is_file() or list(folder.glob("*.safetensors")):
        return _safetensors(folder, config)
    if (folder / "pytorch_model.bin.index.json").is_file() or list(folder.glob("*.bin")):
        return _torch_bin(folder, config)
    raise CheckpointError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")


# How each safetensors dtype is read: numpy dtype of the bytes, then the MLX view of them.
ST_READ = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, mx.bfloat16),
           "F8_E4M3": (np.uint8, None)}  # FP8 stays bytes: fp8.dequantize decodes it


def _safetensors(folder: Path, config: dict) -> Source:
    tensors = {}
    for file, promised in weight_files(folder).items():
        header, data_start = safetensors_header(file)
        absent = sorted(promised - header.keys())
        if absent:
            raise CheckpointError(f"{file}: the index says it holds {absent[:5]} but it does not")
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                tensors[name] = TensorInfo(tuple(info["shape"]), info["dtype"], file, end - start, data_start + start)

    def read(name: str) -> mx.array:
        """Exactly this tensor's bytes, nothing cached: memory stays at one tensor per read."""
        info = tensors[name]
        np_dtype, view = ST_READ.get(info.dtype, (np.float32, None))
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            data = np.fromfile(f, dtype=np_dtype, count=info.nbytes // np.dtype(np_dtype).itemsize).reshape(info.shape)
        array = mx.array(data)
        return array.view(view) if view is not None else array

    return Source(folder, config, tensors, read)


def torch_state(torch, file: Path) -> dict:
    """A .bin's tensors, read with `weights_only` (no pickled code ever runs): memory-mapped when the
    file is in torch's zip format, read whole when it is the legacy (pre-1.6) pickle format."""
    import pickle
    import re
    import zipfile

    try:
        state = torch.load(file, map_location="cpu", mmap=zipfile.is_zipfile(file), weights_only=True)
    except pickle.UnpicklingError as e:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(e))
        if wanted or "Weights only load failed" in str(e):
            what = f" ({wanted.group(1)})" if wanted else ""
            raise CheckpointError(
                f"{file}: this file wants to execute code when it is unpickled{what}; it was not loaded. "
                "Only plain tensors are read from .bin files (torch.load weights_only)"
            ) from None
        raise CheckpointError(f"{file}: not a readable PyTorch weights file ({e})") from None
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable PyTorch weights file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{file}: holds {type(state).__name__}, not a dict of named tensors (a state dict)")
    return state


def _torch_bin(folder: Path, config: dict) -> Source:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{folder}: PyTorch .bin checkpoints need torch to be read: pip install 'mlx-deepseek[torch]'"
        ) from None
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        files = sorted(set(read_weight_map(index).values()))
    else:
        files = sorted(folder.glob("*.bin"))
    tensors, loaded = {}, {}
    for file in files:
        state = torch_state(torch, file)
        for name, t in state.items():
            dtype = TORCH_DTYPES.get(str(t.dtype), str(t.dtype))
            tensors[name] = TensorInfo(tuple(t.shape), dtype, file, t.numel() * t.element_size())
            loaded[name] = t

    def read(name: str) -> mx.array:
        t = loaded[name]
        if t.dtype == torch.bfloat16:
            return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
        if t.dtype == torch.float8_e4m3fn:
            return mx.array(t.view(torch.uint8).numpy())
        return mx.array(np.ascontiguousarray(t.numpy()))

    return Source(folder, config, tensors, read)
