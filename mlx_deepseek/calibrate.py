"""Which experts a workload uses: `python -m mlx_deepseek.calibrate --model M --data TEXT --output usage.json`.

Runs text through a model and counts, for every MoE layer, how often the router picks each
expert. The counts feed the converter's expert-aware recipe (`python -m convert ...
--expert-usage usage.json`), which gives the busy experts more bits. The model can be the source
checkpoint or any conversion of it (a 4-bit model routes almost like the original and fits in
memory where the original does not).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .models.config import ConfigError
from .layout import CheckpointError
from .models.moe import MoE, Router

USAGE_FORMAT = "mlx-deepseek expert usage v1"


class CountingRouter(nn.Module):
    """A router that also adds its choices to `counts` (E,)."""

    def __init__(self, router: Router, experts: int):
        super().__init__()
        self.router = router
        self._counts = mx.zeros((experts,), dtype=mx.int32)

    def __call__(self, x: mx.array):
        indices, weights = self.router(x)
        self._counts = self._counts.at[indices.flatten()].add(1)
        return indices, weights


def count_experts(model, batches: np.ndarray, batch_size: int = 4, progress: bool = True) -> dict[str, list[int]]:
    """Rows of token ids -> {MoE module path: selections per expert}, over every token of every row."""
    from tqdm import tqdm

    moes = [(f"model.layers.{i}.mlp", layer.mlp) for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]
    if not moes:
        raise CheckpointError("the model has no MoE layer: there are no experts to count")
    counters = [CountingRouter(moe.gate, model.args.n_routed_experts) for _, moe in moes]
    for (_, moe), counter in zip(moes, counters):
        moe.gate = counter
    try:
        for start in tqdm(range(0, len(batches), batch_size), desc="calibration", unit="batch", disable=not progress):
            model.hidden(mx.array(batches[start : start + batch_size]))  # the head is not needed
            mx.eval([c._counts for c in counters])
    finally:
        for (_, moe), counter in zip(moes, counters):
            moe.gate = counter.router
    return {f"{path}.switch_mlp": counter._counts.tolist() for (path, _), counter in zip(moes, counters)}


def calibrate(model_path, data: str, window: int = 512, limit: Optional[int] = None, batch: int = 4,
              progress: bool = True) -> dict:
    """The usage file's content: counts per MoE layer and what they were measured on."""
    from .eval import read_tokens
    from .loading import load, resolve_model_path

    model, tokenizer = load(resolve_model_path(model_path))
    ids = read_tokens(tokenizer, data)
    n = min(len(ids) // window, limit or len(ids))
    if n == 0:
        raise CheckpointError(f"--data: {len(ids)} tokens is shorter than one window of {window}")
    rows = ids[: n * window].reshape(n, window)
    counts = count_experts(model, rows, batch, progress)
    return {"format": USAGE_FORMAT, "model": str(model_path), "data": data if len(data) < 200 else data[:200] + "...",
            "tokens": int(rows.size), "experts_per_token": model.args.num_experts_per_tok,
            "n_routed_experts": model.args.n_routed_experts, "counts": counts}


def summary(usage: dict) -> str:
    """Per layer: how concentrated the choices are (what the expert-aware recipe can exploit)."""
    lines = ["| layer | share of picks to the busiest 10% of experts | busiest/median | never picked |", "|---|---|---|---|"]
    for layer, counts in usage["counts"].items():
        c = np.sort(np.array(counts))[::-1]
        top = max(1, len(c) // 10)
        median = float(np.median(c))
        ratio = f"{c[0] / median:.1f}x" if median else "inf"
        lines.append(f"| {layer} | {c[:top].sum() / max(c.sum(), 1):.1%} | {ratio} | {int((c == 0).sum())} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_deepseek.calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model to run (folder or repo; any conversion of the source)")
    p.add_argument("--data", required=True, help="calibration text: a text file, a .npy of token ids, or text")
    p.add_argument("--output", required=True, help="where to write the counts (JSON)")
    p.add_argument("--window", type=int, default=512, help="tokens per forward pass")
    p.add_argument("--windows", type=int, help="use at most this many windows")
    p.add_argument("--batch", type=int, default=4)
    a = p.parse_args(argv)
    output = Path(a.output)
    if not output.parent.is_dir():  # said before the run, not after it
        print(f"error: --output {output}: no folder {output.parent}", file=sys.stderr)
        return 1
    try:
        usage = calibrate(a.model, a.data, a.window, a.windows, a.batch)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    partial = output.with_name(output.name + ".partial")
    partial.write_text(json.dumps(usage, indent=1))
    partial.replace(output)
    print(summary(usage))
    print(f"{usage['tokens']} tokens; counts written to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
