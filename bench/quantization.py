"""What each quantization recipe costs, on a model built for the purpose or on a trained one:

    python -m bench.quantization [--profile cpu|tinyseek|quick]

`cpu`: DeepSeek-V2-Lite's shapes (hidden 2048, 16 heads, experts of width 1408, 6 routed + 2
shared per token) cut to 3 layers (the first dense), 16 experts and a 4,096-token vocabulary,
with random float32 weights (std 0.02), evaluated on random tokens. Random weights are not a real
model's quality: this measures how far each recipe moves the same network's outputs and what it
saves; its perplexities mean nothing, and a random router spreads its picks almost evenly, so
expert-aware bits have little to exploit.
`tinyseek`: shared/models/tinyseek-py (trained, DeepSeek-V3 architecture) on its validation text
(the first 8 windows of 256 tokens), calibrated on the last 16k validation tokens.
`quick`: tinyseek at toy size, for the tests.

Each recipe converts the source and `mlx_deepseek.eval` compares the result with the float32
original: KL, top-1 agreement, greedy flips, bits per weight, size and speed. The `+usage`
recipes (expert-aware bits) count expert choices on the calibration tokens first.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench.common import machine
from bench.synthetic import TINYSEEK, build, results_dir
from mlx_deepseek.calibrate import calibrate
from mlx_deepseek.eval import sweep, write_table

# profile: (synthetic shape or None for tinyseek, window, windows, calibration windows, real text)
PROFILES = {"cpu": (("DeepSeek-V2-Lite", 3, 16, 4096, 1), 128, 2, 8, False),
            "tinyseek": (None, 256, 8, 64, True), "quick": (None, 32, 2, 8, True)}
RECIPES = "8;6;4;3;2;mixed-3-6;mxfp4;3+usage;3+usage:2,4"


def calibration_drift(out, calibration: str, window: int) -> dict:
    """How far expert counts taken on the 4-bit conversion are from the original model's (the
    calibration can run on a conversion when the original does not fit)."""
    original = json.loads((out / "expert_usage.json").read_text())["counts"]
    quantized = calibrate(out / "4", calibration, window, None, 2, progress=False)["counts"]
    a = np.concatenate([original[k] for k in original]).astype(float)
    b = np.concatenate([quantized[k] for k in original]).astype(float)
    return {"correlation": float(np.corrcoef(a, b)[0, 1]),
            "picks_moved": float(np.abs(a - b).sum() / 2 / a.sum())}  # each moved pick leaves one expert, joins another


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=list(PROFILES), default="cpu")
    p.add_argument("--recipes", default=RECIPES)
    a = p.parse_args(argv)
    shape, window, windows, calibration_windows, text = PROFILES[a.profile]
    source = build(*shape, float32=True) if shape else TINYSEEK
    out = results_dir() / f"quantization-{a.profile}"
    out.mkdir(parents=True, exist_ok=True)
    if text:
        ids = np.load(TINYSEEK / "validation" / "val_ids.npy")
        evaluated, calibrating = ids[: window * windows + 1], ids[-window * calibration_windows :]
    else:
        vocab = json.loads((source / "config.json").read_text())["vocab_size"]
        evaluated = np.random.RandomState(0).randint(0, vocab, window * windows + 1)
        calibrating = np.random.RandomState(1).randint(0, vocab, window * calibration_windows)
    data, calibration = out / "data.npy", out / "calibration.npy"
    np.save(data, evaluated)
    np.save(calibration, calibrating)
    rows = sweep(str(source), [r for r in a.recipes.split(";") if r], out, str(data), window, windows, batch=2,
                 calibration=str(calibration))
    drift = None
    if "4" in a.recipes.split(";") and (out / "expert_usage.json").exists():
        drift = calibration_drift(out, str(calibration), window)
        print("Expert counts on the 4-bit conversion against the original's:", drift)
    print(f"{source.name}: {windows} windows of {window} {'validation' if text else 'random'} tokens; {machine()}")
    print(write_table(rows, out))
    (out / "quantization.json").write_text(json.dumps({"machine": machine(), "source": source.name, "rows": rows,
                                                          "calibrated_on_4bit": drift}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
