"""Conversion side by side with mlx_lm.convert: peak RSS, wall time, throughput.

Two synthetic checkpoints with DeepSeek-V2-Lite's per-layer shapes and different numbers of
layers are converted to 4 bits by both tools, each run in its own process measured by
/usr/bin/time. Our peak should stay flat as the model grows; a converter that loads the
model whole grows with it.

    python -m bench.convert_memory [--layers 4 10] [--config DeepSeek-V2-Lite] [--experts N]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from bench.synthetic import ROOT, build

RESULTS = ROOT / "results"


def measure(cmd: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"seconds": seconds, "peak_rss_gb": peak_kb / 1e6}


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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "convert_memory.json").write_text(json.dumps(
        {"machine": platform.machine(), "mlx": mx.__version__, "config": a.config, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
