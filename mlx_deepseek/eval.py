"""What a quantization costs: `python -m mlx_deepseek.eval --model Q [--reference REF] --data FILE_OR_TEXT`.

Reports perplexity on fixed-length windows of the text; against a reference model on the same
tokens, the mean and max KL divergence KL(reference || model) of next-token distributions, top-1
agreement, and the share of positions where the greedy choice flips between right and wrong
(KL also by context length: positions 1-64, 65-256, ... of each window);
the size on disk, bits per weight, peak memory and prefill / decode speed. `--kv-bits` measures
a quantized latent cache instead (the reference then runs the same model with the plain cache).
Sweeps over recipes (convert, then evaluate each) are `python -m convert.sweep`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import numpy as np

from .models.config import ConfigError
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
    from .models.deepseek import Model

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_deepseek.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model to evaluate (folder or repo)")
    p.add_argument("--reference", help="the model to compare with (same vocabulary)")
    p.add_argument("--data", required=True, help="a text file, a .npy of token ids, or text")
    p.add_argument("--window", type=int, default=256, help="tokens predicted per window")
    p.add_argument("--windows", type=int, help="use at most this many windows")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--kv-bits", type=int, choices=(4, 8), help="evaluate a quantized latent cache")
    p.add_argument("--kv-group-size", type=int, default=64)
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    try:
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
