"""What each quantization recipe costs, on a model built for the purpose or on a trained one:

    python -m bench.quantization [--profile cpu|tinyseek|narrow|quick]

`cpu`: DeepSeek-V2-Lite's shapes (hidden 2048, 16 heads, experts of width 1408, 6 routed + 2
shared per token) cut to 3 layers (the first dense), 16 experts and a 4,096-token vocabulary,
with random float32 weights (std 0.02), evaluated on random tokens. Random weights are not a real
model's quality: this measures how far each recipe moves the same network's outputs and what it
saves; its perplexities mean nothing, and a random router spreads its picks almost evenly, so
expert-aware bits have little to exploit.
`tinyseek`: shared/models/tinyseek-py (trained, DeepSeek-V3 architecture) on its validation text
(the first 8 windows of 256 tokens), calibrated on the last 16k validation tokens.
`narrow`: tinyseek on a narrow workload, where routing is more skewed: Python's charmap codec
modules (`encodings/cp*.py`, tables of code points); calibrated on 12 that tinyseek trained on,
evaluated on the 3 of its validation set (cp1253, cp852, cp862).
`quick`: tinyseek at toy size, for the tests.

Each recipe converts the source and `mlx_deepseek.eval` compares the result with the float32
original: KL, top-1 agreement, greedy flips, bits per weight, size and speed (decode speed as the median of several alternating runs). The `+usage`
recipes (expert-aware bits) count expert choices on the calibration tokens first.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from bench.common import machine
from bench.synthetic import TINYSEEK, build, results_dir
from mlx_deepseek import load_model
from mlx_deepseek.calibrate import calibrate
from convert.sweep import sweep, write_table
from mlx_deepseek.eval import speed

VALIDATION = TINYSEEK / "validation" / "val_ids.npy"


def random_tokens(out: Path, source: Path, window: int, windows: int) -> tuple[Path, Path]:
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    np.save(out / "data.npy", np.random.RandomState(0).randint(0, vocab, window * windows + 1))
    np.save(out / "calibration.npy", np.random.RandomState(1).randint(0, vocab, window * 8))
    return out / "data.npy", out / "calibration.npy"


def validation_text(out: Path, source: Path, window: int, windows: int) -> tuple[Path, Path]:
    ids = np.load(VALIDATION)
    np.save(out / "data.npy", ids[: window * windows + 1])
    np.save(out / "calibration.npy", ids[-window * 64 :])
    return out / "data.npy", out / "calibration.npy"


def charmap_codecs(out: Path, source: Path, window: int, windows: int) -> tuple[Path, Path]:
    import encodings

    held_out = {"cp1253.py", "cp852.py", "cp862.py"}  # in tinyseek's validation set
    files = sorted(glob.glob(os.path.join(os.path.dirname(encodings.__file__), "cp*.py")))
    (out / "data.txt").write_text("".join(Path(f).read_text() for f in files if Path(f).name in held_out))
    (out / "calibration.txt").write_text("".join(Path(f).read_text() for f in files if Path(f).name not in held_out)[:180_000])
    return out / "data.txt", out / "calibration.txt"


@dataclass
class Profile:
    shape: Optional[tuple]  # a synthetic model (bench.synthetic.build's arguments), or None: tinyseek
    window: int
    windows: int
    texts: Callable[[Path, Path, int, int], tuple[Path, Path]]  # -> (evaluated, calibration) files
    reps: int  # decode-speed runs per model


PROFILES = {"cpu": Profile(("DeepSeek-V2-Lite", 3, 16, 4096, 1), 128, 2, random_tokens, 1),
            "tinyseek": Profile(None, 256, 8, validation_text, 7),
            "narrow": Profile(None, 256, 16, charmap_codecs, 7),
            "quick": Profile(None, 32, 2, validation_text, 2)}
RECIPES = {"narrow": "4;3;3+usage;3+usage:2,4"}
DEFAULT_RECIPES = "8;6;4;3;2;mixed-3-6;mxfp4;3+usage;3+usage:2,4"


def decode_speeds(folders: dict, prompt: np.ndarray, reps: int) -> dict[str, float]:
    """Median decode tok/s of each model, measured `reps` times in alternation (one run on a shared
    CPU is too noisy to compare recipes)."""
    models = {name: load_model(folder) for name, folder in folders.items()}
    runs = {name: [] for name in models}
    for _ in range(reps):
        for name, model in models.items():
            runs[name].append(speed(model, prompt, steps=32)["decode_tps"])
    return {name: statistics.median(v) for name, v in runs.items()}


def calibration_drift(out: Path, calibration: str, window: int) -> dict:
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
    p.add_argument("--recipes", help=f"';'-separated (default: {DEFAULT_RECIPES}; narrow: {RECIPES['narrow']})")
    a = p.parse_args(argv)
    profile = PROFILES[a.profile]
    recipes = [r for r in (a.recipes or RECIPES.get(a.profile, DEFAULT_RECIPES)).split(";") if r]
    source = build(*profile.shape, float32=True) if profile.shape else TINYSEEK
    out = results_dir() / f"quantization-{a.profile}"
    out.mkdir(parents=True, exist_ok=True)
    data, calibration = profile.texts(out, source, profile.window, profile.windows)
    rows = sweep(str(source), recipes, out, str(data), profile.window, profile.windows, batch=2,
                 calibration=str(calibration))
    if profile.reps > 1:
        prompt = np.load(VALIDATION)[: profile.window]
        speeds = decode_speeds({r["recipe"]: r["model"] for r in rows}, prompt, profile.reps)
        for r in rows:
            r["decode_tps"] = speeds[r["recipe"]]
    drift = None
    if "4" in recipes and (out / "expert_usage.json").exists():
        drift = calibration_drift(out, str(calibration), profile.window)
        print("Expert counts on the 4-bit conversion against the original's:", drift)
    print(f"{source.name} on {data.name}: {profile.windows} windows of {profile.window} tokens; {machine()}")
    print(write_table(rows, out))
    (out / "quantization.json").write_text(json.dumps({"machine": machine(), "source": source.name, "rows": rows,
                                                          "calibrated_on_4bit": drift}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
