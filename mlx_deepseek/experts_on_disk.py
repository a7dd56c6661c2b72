"""Routed experts streamed from the model folder, for models bigger than memory (`load(path, expert_memory_gb=N)`).

Where the bytes are. A converted folder (`python -m convert`, or mlx-lm's) stores each MoE layer's
routed experts stacked: `...switch_mlp.{gate,up,down}_proj.{weight,scales,biases}` of shape
(E, out, in / per-word) for the packed uint32 weight and (E, out, in / group) for scales and biases.
A stack is C-contiguous, so expert e of a tensor is the byte range
    data_start + data_offsets[0] + e * stride,  stride = (data_offsets[1] - data_offsets[0]) / E
of its shard: an expert is 3 x 3 exact ranges (one per projection and part; 2 x 3 in modes without
biases). Float checkpoints in Hugging Face's layout (one tensor per expert) are ranges too, one per
tensor. Ranges are large (R1 4-bit: 7.3 MB per weight, 0.46 MB per scale or bias tensor), so reads
need no change to the converter's layout: shards align tensors only to 8 bytes, which costs nothing
with the page cache (pread copies from it at any offset). Only reads that bypass it (O_DIRECT,
F_NOCACHE) would want page-aligned ranges; then the writer would pad each stacked tensor to 16 KiB.

What runs. Everything but the routed experts of the main layers loads as usual (the MTP layer's
experts too). Each streamed layer's `switch_mlp` becomes a `StreamedExperts` whose pool of S slots
per tensor, (S, out, in), is sized from the budget: S = budget / (MoE layers x bytes per expert).
The router's picks are synchronized to the host once per MoE layer per forward call, `ExpertPool`
places them (LRU or frequency-aware eviction), `ExpertReader` preads the missing experts from a
thread pool straight into MLX buffers, and they are written into the slots; the math is the
resident one. A budget that holds every expert loads them resident instead. Every read batch first
checks that its shards are the files that were opened (device, inode, size, mtime): a shard
replaced or truncated under us is an `ExpertFileChanged` naming the file, never garbage output.
"""

from __future__ import annotations

import os
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .layout import CheckpointError
from .loading import safetensors_header, weight_files
from .models.expert_pool import ExpertPool, ExpertStats
from .models.moe import RoutedExperts
from .models.streamed_experts import StreamedExperts

PROJS = ("gate_proj", "up_proj", "down_proj")
PARTS = ("weight", "scales", "biases")
V4_NATIVE = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# safetensors dtype -> the MLX dtype its bytes are viewed as
MX_DTYPES = {"F32": mx.float32, "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "U8": mx.uint8,
             "I32": mx.int32, "I8": mx.int8}


class ExpertFileChanged(CheckpointError):
    """A shard that streamed experts are read from changed after loading (replaced, truncated, rewritten)."""


@dataclass
class ExpertTensor:
    """One part of one projection of a layer's experts on disk: expert e is nbytes at offsets[e] of file."""
    name: str                # our tensor name, e.g. model.layers.3.mlp.switch_mlp.gate_proj.weight
    file: Path
    offsets: list[int]       # absolute file offset of each expert's bytes
    nbytes: int              # bytes of one expert
    dtype: str               # safetensors dtype
    shape: tuple             # one expert's shape


class ExpertReader:
    """Exact byte ranges of the model's shards, read with pread from a thread pool."""

    def __init__(self, files, threads: int = 8):
        self.fds, self.identity = {}, {}
        for file in sorted(set(files)):
            fd = os.open(file, os.O_RDONLY)
            self.fds[file] = fd
            self.identity[file] = _identity(os.fstat(fd))
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="expert-read")
        self.bytes_read = 0  # bytes actually read from the shards
        self._closer = weakref.finalize(self, _close, self.pool, list(self.fds.values()))  # when the model goes

    def check(self, files) -> None:
        """Each shard is still the file that was opened, whole and unchanged."""
        for file in files:
            try:
                now = _identity(os.stat(file))
            except OSError as e:
                raise ExpertFileChanged(f"{file}: the shard that routed experts stream from is gone ({e})") from None
            if now != self.identity[file] or _identity(os.fstat(self.fds[file])) != self.identity[file]:
                raise ExpertFileChanged(
                    f"{file}: the shard changed since the model was loaded (size {self.identity[file][2]} -> {now[2]} "
                    "bytes, or replaced or rewritten); reload the model")

    def read(self, tensors: list[ExpertTensor], experts: list[int]) -> list[mx.array]:
        """For each tensor, the experts' bytes as an MLX array (len(experts), *shape) of its dtype."""
        return self.start(tensors, experts)()

    def start(self, tensors: list[ExpertTensor], experts: list[int]) -> Callable[[], list[mx.array]]:
        """`read`, started on the thread pool: returns the wait for its arrays (reads overlap
        whatever the caller computes meanwhile).

        The bytes are read straight into a fresh MLX buffer (evaluated, shared with numpy through
        the buffer protocol, referenced by no graph yet), so the only copies are the page cache's
        and the write into the slots."""
        self.check({t.file for t in tensors})
        staging = [mx.zeros((len(experts), t.nbytes), dtype=mx.uint8) for t in tensors]
        mx.eval(staging)
        jobs = [self.pool.submit(self._pread, t.file, t.offsets[e], np.asarray(buf)[i])
                for t, buf in zip(tensors, staging) for i, e in enumerate(experts)]

        def wait() -> list[mx.array]:
            for job in jobs:
                job.result()
            self.bytes_read += sum(buf.nbytes for buf in staging)
            return [buf.view(MX_DTYPES[t.dtype]).reshape(len(experts), *t.shape) for t, buf in zip(tensors, staging)]
        return wait

    def _pread(self, file: Path, offset: int, into: np.ndarray) -> None:
        fd, view, done = self.fds[file], memoryview(into), 0
        while done < into.nbytes:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [view[done:]], offset + done)
            else:  # macOS before Python has preadv there: one copy more
                chunk = os.pread(fd, into.nbytes - done, offset + done)
                n = len(chunk)
                view[done : done + n] = chunk
            if n == 0:
                raise ExpertFileChanged(f"{file}: ends before byte {offset + into.nbytes} (truncated?); reload the model")
            done += n

    def drop_page_cache(self) -> None:
        """Ask the OS to forget the shards' cached pages (for cold-read measurements; Linux, no root)."""
        if hasattr(os, "posix_fadvise"):
            for fd in self.fds.values():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self._closer()
        self.fds = {}


def _close(pool: ThreadPoolExecutor, fds: list[int]) -> None:
    pool.shutdown(wait=False)
    for fd in fds:
        os.close(fd)


def _identity(st: os.stat_result) -> tuple:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class ExpertStream:
    """What `load(..., expert_memory_gb=)` attaches to the model as `model.expert_stream`."""
    reader: ExpertReader
    stats: ExpertStats
    pools: dict[str, ExpertPool]   # module path -> its layer's pool
    slots: int                     # expert slots per layer
    expert_bytes: int              # bytes of one expert in memory (all its tensors)

    def drop_page_cache(self) -> None:
        self.reader.drop_page_cache()


def disk_entries(folder: Path) -> dict[str, tuple[Path, dict, int]]:
    """Every tensor of the folder's shards: name -> (shard, header entry, where the shard's data starts)."""
    entries = {}
    for file in weight_files(folder):
        header, start = safetensors_header(file)
        entries.update((k, (file, v, start)) for k, v in header.items() if k != "__metadata__")
    return entries


def locate(path: str, tensor: str, experts: int, entries: dict) -> ExpertTensor:
    """Where the experts of `{path}.{tensor}` (e.g. gate_proj.weight) are: one stacked tensor under
    our name, or one tensor per expert (Hugging Face's `experts.E.` names, DeepSeek-V4's `experts.E.w1`)."""
    name = f"{path}.{tensor}"
    if name in entries:
        file, entry, start = entries[name]
        stride = (entry["data_offsets"][1] - entry["data_offsets"][0]) // experts
        return ExpertTensor(name, file, [start + entry["data_offsets"][0] + e * stride for e in range(experts)],
                            stride, entry["dtype"], tuple(entry["shape"][1:]))
    proj, part = tensor.split(".")
    stems = [path.replace("switch_mlp", "experts.{}") + f".{proj}.{part}",
             path.replace("switch_mlp", "experts.{}") + f".{V4_NATIVE[proj]}.{part}"]
    for stem in stems:
        if stem.format(0) in entries:
            per = [entries.get(stem.format(e)) for e in range(experts)]
            if any(p is None for p in per):
                raise CheckpointError(f"tensor {stem.format('{E}')}: experts missing on disk")
            file, entry, _ = per[0]
            if any(p[0] != file for p in per):
                raise CheckpointError(f"tensor {stem.format('{E}')}: the experts are spread over several shards; "
                                      "streaming needs each projection's experts in one shard (convert the folder)")
            return ExpertTensor(name, file, [s + e["data_offsets"][0] for _, e, s in per],
                                entry["data_offsets"][1] - entry["data_offsets"][0], entry["dtype"], tuple(entry["shape"]))
    raise CheckpointError(f"tensor {name}: not found on disk as a stack or per expert; expert streaming "
                          "needs a folder written by `python -m convert` (or a float safetensors checkpoint)")


def stream_experts(model, folder: Path, weights: dict, budget_gb: float, quant_params: Callable,
                   cast: Callable[[str, mx.array], mx.array], policy: str = "lfu",
                   pinned: Optional[dict[str, list[int]]] = None, threads: int = 8,
                   model_path: Callable[[str], str] = lambda p: p) -> Optional[ExpertStream]:
    """Swap the main layers' routed experts for streamed ones and edit `weights` to match (their
    stacks out, the empty slot pools in); None (and nothing changed) when the budget holds them all.
    `model_path` maps a module path of `model` to the full model's (a pipeline stage's layers are
    numbered from 0), which is what the folder and the quantization config name."""
    routed = [(p, m) for p, m in model.named_modules() if isinstance(m, RoutedExperts) and not p.startswith("mtp")]
    mixed = [p for p, _ in routed if "expert_bits" in (quant_params(model_path(p)) or {})]
    if mixed:
        raise CheckpointError(f"{folder}: {model_path(mixed[0])}: experts at mixed bit widths (expert_bits) "
                              "cannot be streamed yet")
    layers = [(p, m) for p, m in routed if f"{p}.gate_proj.weight" in weights]
    if not layers:
        raise CheckpointError(f"{folder}: expert_memory_gb: the model has no routed experts to stream")
    E = layers[0][1].gate_proj["weight"].shape[0]
    first = layers[0][0]
    parts = [f"{proj}.{part}" for proj in PROJS for part in PARTS if f"{first}.{proj}.{part}" in weights]
    mem = {t: cast(f"{first}.{t}", weights[f"{first}.{t}"]) for t in parts}
    expert_bytes = sum(v.nbytes // E for v in mem.values())
    total = expert_bytes * E * len(layers)
    budget = int(budget_gb * 1e9)
    if budget >= total:
        return None
    slots = max(1, min(E, budget // (expert_bytes * len(layers))))
    top_k = model.args.num_experts_per_tok
    if slots < top_k:
        warnings.warn(f"expert_memory_gb={budget_gb:g} holds {slots} expert(s) per layer, fewer than the {top_k} "
                      f"one token uses: every token reads experts from disk. One token's experts need "
                      f"{top_k * expert_bytes * len(layers) / 1e9:.3g} GB", stacklevel=4)
    entries = disk_entries(folder)
    located = {p: [locate(model_path(p), t, E, entries) for t in parts] for p, _ in layers}
    for p, tensors in located.items():
        for t, part in zip(tensors, parts):
            expected = tuple(weights[f"{p}.{part}"].shape)
            if (E, *t.shape) != expected or t.dtype not in MX_DTYPES:
                raise CheckpointError(f"{t.file}: tensor {t.name}: {t.dtype} {(E, *t.shape)} on disk, "
                                      f"the model expects {expected}")
    reader = ExpertReader({t.file for ts in located.values() for t in ts}, threads)
    stats = ExpertStats()
    stream = ExpertStream(reader, stats, {}, slots, expert_bytes)
    disk_bytes = sum(t.nbytes for t in located[first])  # one expert as stored (what a miss reads)
    dtypes = {t: v.dtype for t, v in mem.items()}
    for i, (p, m) in enumerate(layers):
        pool = ExpertPool(E, slots, disk_bytes, stats, policy, (pinned or {}).get(p, ()))
        hidden, dims = m.gate_proj["weight"].shape[1], m.down_proj["weight"].shape[1]
        module = StreamedExperts(dims, hidden, slots, pool, _fetcher(reader, located[p], cast),
                                 m.limit, count_tokens=i == 0)
        for proj in PROJS:
            if f"{p}.{proj}.scales" in weights:
                q = quant_params(model_path(f"{p}.{proj}"))
                setattr(module.slots, proj, getattr(module.slots, proj).to_quantized(**q))
        for t in parts:
            del weights[f"{p}.{t}"]
            weights[f"{p}.slots.{t}"] = mx.zeros((slots, *mem[t].shape[1:]), dtype=dtypes[t])
        _set_module(model, p, module)
        stream.pools[p] = pool
    return stream


def _fetcher(reader: ExpertReader, tensors: list[ExpertTensor], cast) -> Callable:
    """A layer's `Fetch`: starts the reads, returns the wait for {"gate_proj.weight": (m, ...), ...}."""
    keys = [".".join(t.name.rsplit(".", 2)[1:]) for t in tensors]

    def fetch(experts: list[int]) -> Callable[[], dict[str, mx.array]]:
        wait = reader.start(tensors, experts)
        return lambda: {key: cast(t.name, value) for key, t, value in zip(keys, tensors, wait())}
    return fetch


def _set_module(model, path: str, module) -> None:
    parent = model
    parts = path.split(".")
    for name in parts[:-1]:
        parent = parent[int(name)] if isinstance(parent, list) else getattr(parent, name)
    setattr(parent, parts[-1], module)


def expert_stats(model) -> Optional[ExpertStats]:
    stream = getattr(model, "expert_stream", None)
    return stream.stats if stream is not None else None
