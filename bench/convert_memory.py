"""Conversion side by side with mlx_lm.convert: peak RSS, wall time, throughput.

Two synthetic checkpoints with DeepSeek-V2-Lite's per-layer shapes and different numbers of
layers are converted to 4 bits by both tools, each run in its own process measured by
its own rusage. Our peak should stay flat as the model grows; a converter that loads the
model whole grows with it.

    python -m bench.convert_memory [--layers 4 10] [--config DeepSeek-V2-Lite] [--experts N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from bench.synthetic import ROOT, build, results_dir



def measure(cmd: list[str]) -> dict:
    """Wall time and peak RSS of one child process (its own rusage, via wait4)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if proc.returncode:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{log.read()[-3000:].decode(errors='replace')}")
    peak_bytes = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # macOS counts bytes, Linux KiB
    return {"seconds": seconds, "peak_rss_gb": peak_bytes / 1e9}


def folder_gb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="DeepSeek-V2-Lite")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 10])
    p.add_argument("--experts", type=int, help="scale the routed experts down (default: the real count)")
    a = p.parse_args(argv)

    rows = []
    for layers in a.layers:
        src = build(a.config, layers, a.experts)
        size = folder_gb(src)
        for tool, cmd in (("mlx-deepseek", [sys.executable, "-m", "convert"]),
                          ("mlx-lm", [sys.executable, "-m", "mlx_lm", "convert"])):
            with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
                out = Path(tmp) / "out"
                m = measure([*cmd, "--hf-path", str(src), "--mlx-path", str(out), "-q"])
                rows.append({"tool": tool, "layers": layers, "source_gb": size, "output_gb": folder_gb(out),
                             **m, "source_gb_per_s": size / m["seconds"]})
        shutil.rmtree(src)

    print(f"\nConversion to 4 bits, {a.config} shapes ({platform.machine()}, MLX {mx.__version__}, {mx.default_device()})\n")
    print("| layers | source GB | tool | peak RSS GB | peak / source | wall s | GB/s |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['source_gb']:.2f} | {r['tool']} | {r['peak_rss_gb']:.2f} | "
              f"{r['peak_rss_gb'] / r['source_gb']:.2f} | {r['seconds']:.1f} | {r['source_gb_per_s']:.3f} |")
    (results_dir() / "convert_memory.json").write_text(json.dumps(
        {"machine": platform.machine(), "mlx": mx.__version__, "config": a.config, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
