"""Writing the output folder: safetensors shards streamed job by job (each header is computed
from the plan's shapes before any data), an index, and an atomic rename at the very end."""

from __future__ import annotations

import json
import os
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from .plan import Plan

ST_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.uint32: "U32", mx.uint8: "U8",
             mx.int32: "I32"}


def shard_jobs(plan: Plan, max_bytes: int) -> list[list]:
    """Consecutive jobs into shards of at most max_bytes (a single larger job gets its own shard)."""
    shards, current, size = [], [], 0
    for job in plan.jobs:
        n = sum(t.nbytes for t in job.outputs)
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(job)
        size += n
    if current:
        shards.append(current)
    return shards


def _as_bytes(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)


def write_shard(file: Path, jobs: list, on_bytes=lambda n: None) -> list[str]:
    """Write one shard, tensors in plan order; returns the names written."""
    header, offset = {"__metadata__": {"format": "mlx"}}, 0
    for job in jobs:
        for t in job.outputs:
            header[t.name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for job in jobs:
            expected = sum(t.nbytes for t in job.outputs)
            written = 0
            for array in job.produce():
                data = _as_bytes(array)
                f.write(data.tobytes(order="C"))
                written += data.nbytes
                on_bytes(data.nbytes)
            if written != expected:
                names = [t.name for t in job.outputs]
                raise RuntimeError(f"internal error: {names} produced {written} bytes, planned {expected}")
    return [t.name for job in jobs for t in job.outputs]


def _remove_stale(dst: Path) -> None:
    """Partial folders of earlier runs that were killed (their process is gone) are removed."""
    if not dst.parent.is_dir():
        return
    for old in dst.parent.glob(f".{dst.name}.partial-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_folder(dst: Path, force: bool):
    """Yields a temporary folder beside dst; renamed to dst only if the block finishes."""
    if dst.exists() and not force:
        raise FileExistsError(f"{dst} exists; pass --force to replace it")
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    _remove_stale(dst)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old)
        else:
            tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
