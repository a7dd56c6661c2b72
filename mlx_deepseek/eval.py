"""What a quantization costs: `python -m mlx_deepseek.eval --model Q [--reference REF] --data FILE_OR_TEXT`.

Reports perplexity on fixed-length windows of the text; against a reference model on the same
tokens, the mean and max KL divergence KL(reference || model) of next-token distributions, top-1
agreement, and the share of positions where the greedy choice flips between right and wrong
(KL also by context length: positions 1-64, 65-256, ... of each window);
the size on disk, bits per weight, peak memory and prefill / decode speed. `--kv-bits` measures
a quantized latent cache instead (the reference then runs the same model with the plain cache).
`--sweep SRC --recipes "4;3;mixed-3-6;3+usage"` converts SRC with each recipe and evaluates each
against SRC itself: a markdown table, a CSV and a plot of KL against bits per weight. `+usage`
entries use expert-aware bits counted on `--calibration` text.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .config import ConfigError
from .layout import CheckpointError


@dataclass
class Quality:
    tokens: int
    perplexity: float
    kl_mean: Optional[float] = None
    kl_max: Optional[float] = None
    top1_agreement: Optional[float] = None
    greedy_flips: Optional[float] = None
    kl_by_context: Optional[dict] = None  # mean KL of the positions in each range of context length


# Context ranges for `kl_by_context`: a quantized cache's error grows with what it holds.
CONTEXT_EDGES = (64, 256, 1024, 4096, 16384, 65536)


def _context_buckets(length: int) -> list[tuple[str, int, int]]:
    edges = [0] + [e for e in CONTEXT_EDGES if e < length] + [length]
    return [(f"{lo + 1}-{hi}", lo, hi) for lo, hi in zip(edges, edges[1:])]


def read_tokens(tokenizer, data: str) -> np.ndarray:
    """A .npy file of token ids, a text file, or the text itself."""
    try:
        path = Path(data) if Path(data).is_file() else None
    except OSError:  # text too long to be a file name
        path = None
    if data.endswith(".npy"):
        if path is None:
            raise CheckpointError(f"--data {data}: no such file")
        try:
            return np.load(path).astype(np.int64).reshape(-1)
        except ValueError as e:
            raise CheckpointError(f"--data {data}: not a readable .npy array of token ids ({e})") from e
    if path is not None:
        try:
            return np.array(tokenizer.encode(path.read_text()), dtype=np.int64)
        except UnicodeDecodeError as e:
            raise CheckpointError(f"--data {data}: not UTF-8 text ({e})") from e
    return np.array(tokenizer.encode(data), dtype=np.int64)


def windows(ids: np.ndarray, length: int, limit: Optional[int] = None) -> np.ndarray:
    """Non-overlapping windows of length + 1 tokens (each predicts `length` tokens)."""
    n = (len(ids) - 1) // length
    if n == 0:
        raise CheckpointError(f"--data: {len(ids)} tokens is shorter than one window of {length + 1}")
    n = min(n, limit) if limit else n
    return np.stack([ids[i * length : i * length + length + 1] for i in range(n)])


def _log_probs(model, x: mx.array, kv_bits: Optional[int], kv_group_size: int) -> mx.array:
    cache = model.make_cache(kv_bits, kv_group_size) if kv_bits else None
    logits = model(x, cache=cache).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def quality(model, batches: np.ndarray, reference=None, batch_size: int = 4, kv_bits: Optional[int] = None,
            kv_group_size: int = 64, progress: bool = True) -> Quality:
    from tqdm import tqdm

    nll = kl_sum = kl_max = agree = flips = 0.0
    count = 0
    buckets = _context_buckets(batches.shape[1] - 1)
    kl_context = np.zeros(len(buckets))
    for start in tqdm(range(0, len(batches), batch_size), desc="windows", unit="batch", disable=not progress):
        chunk = mx.array(batches[start : start + batch_size])
        x, target = chunk[:, :-1], chunk[:, 1:]
        lp = _log_probs(model, x, kv_bits, kv_group_size)
        nll += -mx.take_along_axis(lp, target[..., None], axis=-1).sum().item()
        count += target.size
        if reference is not None:
            ref = _log_probs(reference, x, None, kv_group_size)
            kl = (mx.exp(ref) * (ref - lp)).sum(axis=-1)
            kl_sum += kl.sum().item()
            kl_context += [kl[:, lo:hi].sum().item() for _, lo, hi in buckets]
            kl_max = max(kl_max, kl.max().item())
            ours, theirs = lp.argmax(-1), ref.argmax(-1)
            agree += (ours == theirs).sum().item()
            flips += ((ours == target) != (theirs == target)).sum().item()
    result = Quality(count, float(np.exp(nll / count)))
    if reference is not None:
        result.kl_mean, result.kl_max = kl_sum / count, kl_max
        result.top1_agreement, result.greedy_flips = agree / count, flips / count
        result.kl_by_context = {name: total / (len(batches) * (hi - lo))
                                for (name, lo, hi), total in zip(buckets, kl_context)}
    return result


def footprint(folder: Path, model) -> dict:
    """Size of the weight files, and bits per weight of the main model (its tensors' bytes over its
    unquantized parameter count; an MTP layer is left out of both)."""
    from mlx.utils import tree_flatten

    from .layout import is_mtp_tensor
    from .loading import entry_nbytes, tensor_headers
    from .model import Model

    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    main = sum(entry_nbytes(e) for name, e in tensor_headers(folder).items() if not is_mtp_tensor(name, model.args))
    params = sum(v.size for _, v in tree_flatten(Model(model.args).parameters()))  # lazy: nothing allocated
    return {"size_gb": size / 1e9, "bits_per_weight": main * 8 / params}


def speed(model, prompt: np.ndarray, steps: int = 16, kv_bits=None, kv_group_size=64) -> dict:
    cache = model.make_cache(kv_bits, kv_group_size)
    x = mx.array(prompt[None])
    start = time.perf_counter()
    logits = model(x, cache=cache)
    mx.eval(logits)
    prefill = time.perf_counter() - start
    y = mx.argmax(logits[:, -1:], axis=-1)
    start = time.perf_counter()
    for _ in range(steps):
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.eval(y)
    return {"prefill_tps": len(prompt) / prefill, "decode_tps": steps / (time.perf_counter() - start)}


def evaluate(model_path, reference_path, data: str, window: int, limit: Optional[int], batch: int,
             kv_bits: Optional[int] = None, kv_group_size: int = 64, progress: bool = True) -> dict:
    from .loading import load, load_model, resolve_model_path

    folder = resolve_model_path(model_path)
    model, tokenizer = load(folder)
    reference = None
    if reference_path is not None:
        reference = load_model(reference_path)
        if reference.args.vocab_size != model.args.vocab_size:
            raise CheckpointError(f"--reference {reference_path}: vocabulary of {reference.args.vocab_size} tokens, "
                                  f"the model has {model.args.vocab_size}: they cannot be compared token by token")
    elif kv_bits:
        reference = model  # the same weights with the plain cache
    batches = windows(read_tokens(tokenizer, data), window, limit)
    mx.reset_peak_memory()
    q = quality(model, batches, reference, batch, kv_bits, kv_group_size, progress)
    return {"model": str(model_path), **asdict(q), **footprint(folder, model),
            "peak_memory_gb": mx.get_peak_memory() / 1e9, **speed(model, batches[0], kv_bits=kv_bits,
                                                                   kv_group_size=kv_group_size)}


def sweep(source: str, recipes: list[str], out: Path, data: str, window: int, limit, batch: int,
          calibration: Optional[str] = None) -> list[dict]:
    from convert.cli import main as convert

    usage = out / "expert_usage.json"
    if any("+usage" in r for r in recipes) and not usage.exists():
        if calibration is None:
            raise CheckpointError("--sweep: recipes with +usage need --calibration DATA (text other than --data, "
                                  "or the measurement rewards fitting the test text)")
        from .calibrate import calibrate

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
    p = argparse.ArgumentParser(prog="python -m mlx_deepseek.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="the model to evaluate (folder or repo)")
    p.add_argument("--reference", help="the model to compare with (same vocabulary)")
    p.add_argument("--data", required=True, help="a text file, a .npy of token ids, or text")
    p.add_argument("--window", type=int, default=256, help="tokens predicted per window")
    p.add_argument("--windows", type=int, help="use at most this many windows")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--kv-bits", type=int, choices=(4, 8), help="evaluate a quantized latent cache")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--sweep", metavar="SRC", help="convert SRC with each of --recipes and evaluate each")
    p.add_argument("--recipes", default="8;6;4;3;mixed-3-6",
                   help="';'-separated: bits, an mx mode or a recipe, each optionally with +usage[:WIDTHS] "
                        "(expert-aware bits; needs --calibration)")
    p.add_argument("--calibration", help="with +usage recipes: text to count expert choices on (not --data)")
    p.add_argument("--out", default="eval-sweep", help="where --sweep writes models and tables")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    try:
        if a.sweep:
            rows = sweep(a.sweep, [r for r in a.recipes.split(";") if r], Path(a.out), a.data, a.window, a.windows,
                         a.batch, a.calibration)
            print(write_table(rows, Path(a.out)))
            result = rows
        else:
            if not a.model:
                p.error("--model is required (or --sweep SRC)")
            result = evaluate(a.model, a.reference, a.data, a.window, a.windows, a.batch, a.kv_bits, a.kv_group_size)
            for k, v in result.items():
                if isinstance(v, dict):
                    v = "  ".join(f"{name}: {x:.4g}" for name, x in v.items())
                print(f"{k:>16}: {v:.6g}" if isinstance(v, float) else f"{k:>16}: {v}")
    except (CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
