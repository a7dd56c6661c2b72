"""Per-token cost of the pipeline: the same decode on one process and on 2 ranks over loopback
(ring backend), on the tinyseek shape; the activation bytes each token sends; and what the
transfer costs at Thunderbolt 5 and 10 GbE speeds for DeepSeek-R1's hidden size.

    python -m bench.pipeline
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import converted, machine
from bench.synthetic import results_dir

MLX_LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; sys.exit(main())"
# Measured by each run: decode steps of one token (greedy), after a 64-token prompt.
PROBE = """
import json, sys, time
import mlx.core as mx
from mlx_deepseek import load_model
from mlx_deepseek.pipeline import pipeline
folder, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
group = mx.distributed.init()
if group.size() > 1:
    model, tok = pipeline(folder)
    if tok is None:
        model.serve(); sys.exit(0)
else:
    model = load_model(folder)
cache = model.make_cache()
y = mx.argmax(model(mx.arange(64)[None], cache=cache)[:, -1:], axis=-1)
mx.eval(y)
start = time.perf_counter()
for _ in range(steps):
    y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
    mx.eval(y)
seconds = (time.perf_counter() - start) / steps
if group.size() > 1:
    model.stop()
json.dump({"seconds_per_token": seconds, "hidden": model.args.hidden_size}, open(out, "w"))
"""

LINKS = {"Thunderbolt 5 (80 Gb/s, ~30 us per hop)": (10e9, 30e-6), "10 GbE (~100 us per hop)": (1.25e9, 100e-6)}


def run(folder: Path, ranks: int, steps: int = 64) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        probe, out = Path(tmp, "probe.py"), Path(tmp, "out.json")
        probe.write_text(PROBE)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        if ranks == 1:
            cmd = [sys.executable, str(probe), str(folder), str(out), str(steps)]
        else:
            cmd = [sys.executable, "-c", MLX_LAUNCH, "-n", str(ranks), "--backend", "ring", "--starting-port", "5620",
                   "--python", sys.executable, str(probe), str(folder), str(out), str(steps)]
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=600)
        return json.loads(out.read_text())


def main(argv=None) -> int:
    folder = converted("tinyseek", 4, 16)
    one, two = run(folder, 1), run(folder, 2)
    overhead = two["seconds_per_token"] - one["seconds_per_token"]
    hops = 2  # rank 0 -> rank 1 -> rank 0
    print(f"\nPipeline overhead, tinyseek shape 4-bit, 2 ranks over loopback ({machine()})\n")
    print(f"one process: {one['seconds_per_token'] * 1e3:.2f} ms/token; 2 ranks: {two['seconds_per_token'] * 1e3:.2f} "
          f"ms/token; overhead {overhead * 1e3:.2f} ms/token ({hops} hops of {one['hidden'] * 4} bytes, float32)")
    print("\nDeepSeek-R1 (hidden 7168, bf16: 14,336 bytes per token per hop), per decoded token:\n")
    print("| link | ranks | hops | transfer us | latency us | total us |\n|---|---:|---:|---:|---:|---:|")
    rows = []
    for link, (bandwidth, latency) in LINKS.items():
        for ranks in (2, 3):
            transfer = ranks * 14336 / bandwidth
            rows.append({"link": link, "ranks": ranks, "microseconds": (transfer + ranks * latency) * 1e6})
            print(f"| {link} | {ranks} | {ranks} | {transfer * 1e6:.1f} | {ranks * latency * 1e6:.0f} | "
                  f"{rows[-1]['microseconds']:.0f} |")
    (results_dir() / "pipeline.json").write_text(json.dumps(
        {"machine": machine(), "one_process": one, "two_ranks": two, "overhead_seconds": overhead, "links": rows},
        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
