"""Draws the latest benchmark results (bench/results/*.json) as PNG files beside them.

    python -m bench.plots        # needs matplotlib: pip install 'mlx-deepseek[bench]'
"""

from __future__ import annotations

import json
import sys

from bench.synthetic import results_dir



def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    results = results_dir()
    for file in sorted(results.glob("runtime-*.json")):
        rows = json.loads(file.read_text())["rows"]
        families = sorted({r["family"] for r in rows})
        fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4), squeeze=False)
        for ax, family in zip(axes[0], families):
            sub = [r for r in rows if r["family"] == family]
            labels = [f"{r['kind']}\n{r['tokens']}@{r['context']}" for r in sub]
            ratios = [r["mlx-deepseek"]["median"] / r["mlx-lm"]["median"] for r in sub]
            ax.bar(labels, ratios, color=["tab:green" if x >= 1 else "tab:red" for x in ratios])
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_title(f"{family}: speed, mlx-deepseek / mlx-lm")
            ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        fig.savefig(file.with_suffix(".png"), dpi=120)
        drawn.append(file.with_suffix(".png"))
    memory = results / "convert_memory.json"
    if memory.exists():
        rows = json.loads(memory.read_text())["rows"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for tool in ("mlx-deepseek", "mlx-lm"):
            sub = [r for r in rows if r["tool"] == tool]
            ax.plot([r["source_gb"] for r in sub], [r["peak_rss_gb"] for r in sub], marker="o", label=tool)
        ax.set_xlabel("source checkpoint (GB)")
        ax.set_ylabel("peak RSS while converting (GB)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(memory.with_suffix(".png"), dpi=120)
        drawn.append(memory.with_suffix(".png"))
    for path in drawn:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
