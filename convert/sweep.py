"""Recipe sweeps: `python -m convert.sweep SRC --recipes "8;4;3;mixed-3-6;3+usage" --data FILE --out DIR`.

Converts SRC with each recipe and evaluates each against SRC itself (`mlx_deepseek.eval`): a
markdown table, a CSV and a plot of KL against bits per weight. `+usage` entries use expert-aware
bits counted on `--calibration` text. A sweep that stopped resumes: each folder keeps its results.
It sits above both packages: it drives the converter and the evaluation, neither imports it.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

from mlx_deepseek.calibrate import calibrate
from mlx_deepseek.eval import evaluate
from mlx_deepseek.layout import CheckpointError
from mlx_deepseek.models.config import ConfigError

from .cli import main as convert


def sweep(source: str, recipes: list[str], out: Path, data: str, window: int, limit, batch: int,
          calibration: Optional[str] = None) -> list[dict]:
    usage = out / "expert_usage.json"
    if any("+usage" in r for r in recipes) and not usage.exists():
        if calibration is None:
            raise CheckpointError("--sweep: recipes with +usage need --calibration DATA (text other than --data, "
                                  "or the measurement rewards fitting the test text)")
        out.mkdir(parents=True, exist_ok=True)
        usage.write_text(json.dumps(calibrate(source, calibration, window, None, batch)))  # all of it
    # A sweep that stopped half-way resumes: results measured on the same tokens are kept.
    setting = {"source": str(source), "data": _digest(data), "window": window, "windows": limit}
    rows = []
    for recipe in recipes:
        folder = out / recipe.replace("/", "_").replace(",", "+").replace("=", "").replace(":", "_")
        if not (folder / "config.json").exists():
            if convert(["--hf-path", source, "--mlx-path", str(folder), *_convert_flags(recipe, usage)]) != 0:
                raise CheckpointError(f"--sweep: converting {source} with {recipe!r} failed (see above)")
        done = folder / "eval.json"
        kept = json.loads(done.read_text()) if done.exists() else {}
        if kept.get("setting") != setting:
            kept = {"setting": setting, "result": evaluate(folder, source, data, window, limit, batch)}
            done.write_text(json.dumps(kept, indent=1))
        rows.append({"recipe": recipe, **kept["result"]})
    return rows


def _digest(data: str) -> str:
    """What identifies the evaluated tokens: the file's bytes, or the text."""
    try:
        content = Path(data).read_bytes() if Path(data).is_file() else data.encode()
    except OSError:
        content = data.encode()
    return hashlib.sha256(content).hexdigest()[:16]


def _convert_flags(recipe: str, usage: Path) -> list[str]:
    """A sweep entry -> converter flags: bits ("3"), an mx mode, a recipe, each optionally followed by
    "+usage" (expert-aware bits from the calibration) and ":WIDTHS" ("3+usage:2,4")."""
    base, aware, widths = recipe.partition("+usage")
    if base.isdigit():
        flags = ["-q", "--q-bits", base]
    elif base in ("mxfp4", "nvfp4", "mxfp8"):
        flags = ["-q", "--q-mode", base] + (["--q-bits", "8"] if base == "mxfp8" else [])
    else:
        flags = ["-q", "--recipe", base]
    if aware:
        flags += ["--expert-usage", str(usage)] + (["--expert-bits", widths[1:]] if widths else [])
    return flags


def write_table(rows: list[dict], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    keys = ["recipe", "bits_per_weight", "size_gb", "perplexity", "kl_mean", "kl_max", "top1_agreement",
            "greedy_flips", "peak_memory_gb", "prefill_tps", "decode_tps"]
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    table = "\n".join(lines)
    (out / "sweep.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["bits_per_weight"] for r in rows], [r["kl_mean"] for r in rows], "o")
        for r in rows:
            ax.annotate(r["recipe"], (r["bits_per_weight"], r["kl_mean"]), fontsize=7)
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("mean KL to the unquantized model")
        ax.set_yscale("log")
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=120)
    except ImportError:
        print("(no plot: pip install matplotlib)", file=sys.stderr)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC", help="the checkpoint to convert with each recipe (folder or repo)")
    p.add_argument("--recipes", default="8;6;4;3;mixed-3-6",
                   help="';'-separated: bits, an mx mode or a recipe, each optionally with +usage[:WIDTHS] "
                        "(expert-aware bits; needs --calibration)")
    p.add_argument("--data", required=True, help="a text file, a .npy of token ids, or text")
    p.add_argument("--calibration", help="with +usage recipes: text to count expert choices on (not --data)")
    p.add_argument("--window", type=int, default=256, help="tokens predicted per window")
    p.add_argument("--windows", type=int, help="use at most this many windows")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--out", default="eval-sweep", help="where the models and tables go")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    try:
        rows = sweep(a.source, [r for r in a.recipes.split(";") if r], Path(a.out), a.data, a.window, a.windows,
                     a.batch, a.calibration)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(write_table(rows, Path(a.out)))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
