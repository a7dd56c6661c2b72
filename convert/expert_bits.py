"""The expert-aware recipe: per-expert bit widths from how often a workload picks each expert.

Input: the counts written by `python -m mlx_deepseek.calibrate`. The error a quantized weight adds
shrinks as 2^-2b with b bits (halving the step quarters the squared error), and an expert's error
reaches the output as often as the router picks it; so an expert's cost is `count * 2^-2b`.
Every expert starts at the lowest width; upgrades are taken greedily, the one that removes most
cost per added bit first, while the average (bits plus scale/bias overhead per weight, as
"bits per weight" counts it) stays within the target. Experts never picked stay at the lowest
width. The budget is shared by all layers: every layer makes the same number of picks per token,
so counts of different layers weigh alike.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Optional

from mlx_deepseek.calibrate import USAGE_FORMAT
from mlx_deepseek.models.config import ModelArgs

from .recipes import MODES, Quant, RecipeError


def read_usage(file: Path, args: ModelArgs) -> dict:
    """The calibration file, checked against the model being converted."""
    try:
        usage = json.loads(Path(file).read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        raise RecipeError(f"--expert-usage {file}: not a readable JSON file ({e})") from None
    if not isinstance(usage, dict) or usage.get("format") != USAGE_FORMAT:
        raise RecipeError(f"--expert-usage {file}: not an expert-usage file (write one with python -m mlx_deepseek.calibrate)")
    expected = [f"model.layers.{i}.mlp.switch_mlp" for i in range(args.num_hidden_layers) if args.is_moe_layer(i)]
    counts = usage.get("counts", {})
    if not isinstance(counts, dict):
        raise RecipeError(f"--expert-usage {file}: counts must map MoE layers to lists of counts")
    if sorted(counts) != sorted(expected):
        missing, extra = sorted(set(expected) - set(counts)), sorted(set(counts) - set(expected))
        raise RecipeError(f"--expert-usage {file}: counts are for other layers than this model's MoE layers "
                          f"(missing {missing[:3]}, unexpected {extra[:3]}); was it measured on this model?")
    for layer, c in counts.items():
        if not isinstance(c, list) or len(c) != args.n_routed_experts or any(type(v) is not int or v < 0 for v in c):
            raise RecipeError(f"--expert-usage {file}: {layer} has {len(c) if isinstance(c, list) else c!r} counts, expected "
                              f"{args.n_routed_experts} non-negative integers (one per routed expert)")
    return usage


def allocate(counts: dict[str, list[int]], widths: list[int], target: float, overhead: float) -> dict[str, list[int]]:
    """{layer: counts} -> {layer: bits per expert}, averaging at most `target` bits per weight."""
    widths = sorted(set(widths))
    low, high = widths[0] + overhead, widths[-1] + overhead
    if target < low - 1e-9:
        raise RecipeError(f"--target-bits {target:g}: below the lowest width's {low:g} bits per weight "
                          f"({widths[0]} bits + {overhead:g} for scales and biases)")
    layers = list(counts)
    level = {layer: [0] * len(counts[layer]) for layer in layers}
    experts = sum(len(c) for c in counts.values())
    spare = (min(target, high) - low) * experts  # bits per weight to hand out, summed over experts

    def upgrade(layer_index: int, e: int, i: int):
        count = counts[layers[layer_index]][e]
        step = widths[i + 1] - widths[i]
        gain = count * (2.0 ** (-2 * widths[i]) - 2.0 ** (-2 * widths[i + 1])) / step
        return (-gain, layer_index, e, i)

    heap = [upgrade(li, e, 0) for li, layer in enumerate(layers) for e in range(len(counts[layer]))]
    heapq.heapify(heap)
    while heap and spare > 1e-9:
        _, li, e, i = heapq.heappop(heap)
        step = widths[i + 1] - widths[i]
        if step > spare + 1e-9:
            continue  # too big for what is left; a smaller step of another expert may still fit
        spare -= step
        level[layers[li]][e] = i + 1
        if i + 2 < len(widths):
            heapq.heappush(heap, upgrade(li, e, i + 1))
    return {layer: [widths[i] for i in level[layer]] for layer in layers}


def expert_aware_bits(usage: dict, base: Optional[Quant], widths: list[int], target: Optional[float],
                      scale_bits: int) -> tuple[dict[str, list[int]], float, float]:
    """(bits per expert by layer, target, achieved average bits per weight) for the routed experts.

    `base` is what the recipe gives routed experts otherwise; without `target` the average matches
    it, so the output is as large as the uniform conversion and only the bits move.
    """
    if base is None or base.mode != "affine":
        raise RecipeError("--expert-usage: the routed experts must be quantized in affine mode "
                          "(pass -q, and no mx mode or 'routed_experts=none' in --recipe)")
    allowed = MODES["affine"][1]
    bad = [w for w in widths if w not in allowed]
    if bad or not widths:
        raise RecipeError(f"--expert-bits: widths must be among {list(allowed)}, got {widths}")
    overhead = 2 * scale_bits / base.group_size  # an affine group's scale and bias
    if target is None:
        target = base.bits + overhead
    bits = allocate(usage["counts"], widths, target, overhead)
    flat = [b for layer in bits.values() for b in layer]
    return bits, target, sum(flat) / len(flat) + overhead
