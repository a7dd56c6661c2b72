"""Shared by the runtime benchmarks: a converted 4-bit DeepSeek-shaped model, both runners on it,
and timing with median and spread."""

from __future__ import annotations

import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from bench.synthetic import build


def converted(config: str, layers: int, experts: int, vocab: int | None = None, dense_layers: int | None = None,
              overrides: dict | None = None) -> Path:
    """A 4-bit conversion (float32 scales, so activations run in float32) of a synthetic checkpoint."""
    src = build(config, layers, experts, vocab, dense_layers, overrides=overrides)
    out = src.with_name(src.name + "-4bit-f32")
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "convert", "--hf-path", str(src), "--mlx-path", str(out), "-q",
                        "--dtype", "float32"], check=True)
    return out


def load_both(folder: Path):
    """(name, model, make_cache) for mlx-deepseek and mlx-lm on the same folder."""
    import mlx_lm
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_deepseek import load_model

    ours = load_model(folder)
    theirs, _ = mlx_lm.load(str(folder))
    return [("mlx-deepseek", ours, ours.make_cache), ("mlx-lm", theirs, lambda: make_prompt_cache(theirs))]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def machine() -> str:
    return f"{platform.machine()} {platform.system()}, MLX {mx.__version__} on {mx.default_device()}"


def greedy(model, cache, prompt: mx.array, steps: int) -> list[int]:
    """The common decode driver: one token per step, evaluated at the same boundary for both runners."""
    logits = model(prompt[None], cache=cache)[:, -1]
    out = []
    for _ in range(steps):
        y = mx.argmax(logits, axis=-1)
        mx.eval(y)
        out.append(y.item())
        logits = model(y[:, None], cache=cache)[:, -1]
    return out
