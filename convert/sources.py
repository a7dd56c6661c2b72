"""Reading a source checkpoint one tensor at a time: safetensors (lazily, via mx.load) or PyTorch
.bin (memory-mapped, `weights_only=True`: pickled code is never executed). Block-FP8 weights (float32
or e8m0 scales) and DeepSeek-V4's FP4 experts are dequantized as they are read (see fp8.py,
fp4.py); `read_fp4` gives an FP4 tensor's bytes as they are, to carry them over."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from mlx_deepseek.layout import CheckpointError
from mlx_deepseek.loading import read_weight_map, safetensors_header, weight_files

from . import fp4, fp8

TORCH_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                "torch.float8_e4m3fn": "F8_E4M3", "torch.int64": "I64", "torch.int32": "I32", "torch.int8": "I8",
                "torch.uint8": "U8", "torch.float8_e8m0fnu": "F8_E8M0"}
FLOAT_DTYPES = {"F32", "F16", "BF16", "F8_E4M3"}
# Integer tensors a checkpoint may hold as they are: DeepSeek-V4's token -> expert table.
INTEGER_TENSORS = {"tid2eid": ("I64", "I32")}


@dataclass
class TensorInfo:
    shape: tuple
    dtype: str            # safetensors notation: F32, BF16, F8_E4M3, ...
    file: Path
    nbytes: int
    offset: int = 0       # where its bytes start in `file` (safetensors)


class Source:
    """Name -> shape/dtype of every tensor, and `read(name)` -> mx.array, dequantizing FP8 and FP4."""

    def __init__(self, folder: Path, config: dict, tensors: dict[str, TensorInfo],
                 reader: Callable[..., mx.array]):
        self.folder, self.config, self.tensors, self._read = folder, config, tensors, reader
        self.fp8_block = fp8.block_size(config, folder)
        self.fp8_scales = fp8.check_scales(tensors, self.fp8_block) if self.fp8_block else {}
        self.fp4_scales = fp4.check_scales(tensors)
        scales = set(self.fp8_scales.values()) | set(self.fp4_scales.values())
        for name, info in tensors.items():
            if name in scales or name in self.fp4_scales:
                continue
            if info.dtype == "F8_E4M3" and name not in self.fp8_scales:
                raise CheckpointError(f"{info.file}: tensor {name} is FP8 but config.json announces no FP8 quantization")
            allowed = next((d for suffix, d in INTEGER_TENSORS.items() if name.endswith(suffix)), ())
            if info.dtype not in FLOAT_DTYPES and info.dtype not in allowed:
                raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}; expected a float type")

    def names(self) -> list[str]:
        """Tensor names, without the FP8/FP4 scales (they are folded into their weights on read)."""
        scales = set(self.fp8_scales.values()) | set(self.fp4_scales.values())
        return [n for n in self.tensors if n not in scales]

    def shape(self, name: str) -> tuple:
        """The tensor's shape as a matrix of values (an FP4 tensor holds two per byte)."""
        shape = tuple(self.tensors[name].shape)
        return fp4.logical_shape(shape) if name in self.fp4_scales else shape

    def is_fp4(self, name: str) -> bool:
        return name in self.fp4_scales

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> mx.array:
        """The tensor (float32 when it was FP8/FP4); `rows=(start, stop)` reads only that part of
        its first axis (an expert of a stacked tensor)."""
        if name in self.fp8_scales:
            scale = self.fp8_scales[name]
            return fp8.dequantize(self._read(name), self._read(scale), self.fp8_block, self.tensors[scale].dtype)
        if name in self.fp4_scales:
            return fp4.dequantize(*self.read_fp4(name))
        return self._read(name, rows)

    def read_fp4(self, name: str) -> tuple[mx.array, mx.array]:
        """An FP4 tensor's packed bytes (uint8 [out, in/2]) and e8m0 scales (uint8 [out, in/32]), as stored."""
        return self._read(name), self._read(self.fp4_scales[name])


def open_source(folder: Path, config: dict) -> Source:
    if (folder / "model.safetensors.index.json").is_file() or list(folder.glob("*.safetensors")):
        return _safetensors(folder, config)
    if (folder / "pytorch_model.bin.index.json").is_file() or list(folder.glob("*.bin")):
        return _torch_bin(folder, config)
    raise CheckpointError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")


# How each safetensors dtype is read: numpy dtype of the bytes, then the MLX view of them.
ST_READ = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, mx.bfloat16),
           "F8_E4M3": (np.uint8, None), "F8_E8M0": (np.uint8, None),  # FP8 and e8m0 stay bytes (fp8.py decodes)
           "I8": (np.uint8, None), "U8": (np.uint8, None),  # FP4 pairs: bytes as stored (fp4.py)
           "I64": (np.int64, None), "I32": (np.int32, None)}


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

    def read(name: str, rows=None) -> mx.array:
        """Exactly this tensor's bytes (or those of rows start..stop of its first axis), nothing
        cached: memory stays at one tensor per read."""
        info = tensors[name]
        np_dtype, view = ST_READ.get(info.dtype, (np.float32, None))
        shape, offset, nbytes = tuple(info.shape), info.offset, info.nbytes
        if rows is not None:
            row_bytes = nbytes // shape[0]
            shape = (rows[1] - rows[0], *shape[1:])
            offset, nbytes = offset + rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes
        with open(info.file, "rb") as f:
            f.seek(offset)
            data = np.fromfile(f, dtype=np_dtype, count=nbytes // np.dtype(np_dtype).itemsize).reshape(shape)
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

    def read(name: str, rows=None) -> mx.array:
        t = loaded[name] if rows is None else loaded[name][rows[0] : rows[1]]
        if t.dtype == torch.int8:
            return mx.array(t.view(torch.uint8).numpy())
        if t.dtype == torch.bfloat16:
            return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e8m0fnu):
            return mx.array(t.view(torch.uint8).numpy())
        return mx.array(np.ascontiguousarray(t.numpy()))

    return Source(folder, config, tensors, read)
