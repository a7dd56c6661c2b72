"""Operations one decode step runs, and decode speed, mlx-deepseek against mlx-lm on one checkpoint.

On an Apple GPU each primitive of the lazy graph that computes (not a view: reshape, slice,
broadcast, transpose) is about one kernel launch, and batch-1 MoE decoding of a 61-layer model is
dominated by launches and small reads. The graph of one step's logits (a cache already holding
`context` tokens) is written with `mx.export_to_dot` and its nodes counted, split by layer kind
(attention, dense MLP, MoE, the rest: embedding, norms, residuals, head, log-softmax) and for the
sampler.

MLX's CPU backend runs `mx.fast.rms_norm`, `rope`, `scaled_dot_product_attention` and
`mx.dequantize` as their decomposition (a dozen nodes each) where a GPU runs one kernel; `kernels` counts each such call
once, so it estimates what a GPU launches. `nodes` is the raw count on this backend.

Decode tok/s is timed in one process per runner (alternating, median of `--reps`), after checking
that the runners' greedy tokens agree. `--before DIR` adds mlx-deepseek from another checkout
(e.g. `git worktree add /tmp/before <commit>`) for a before/after.

    python -m bench.primitives [--context 64] [--tokens 64] [--reps 3] [--before DIR]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from bench.common import converted, machine, summary, timed

RESULTS = Path(__file__).parent / "results"
VIEWS = {"Broadcast", "ExpandDims", "Reshape", "Squeeze", "Flatten", "Unflatten", "Slice", "Split",
         "Transpose", "StopGradient"}
# Ops a GPU runs as one kernel that this backend decomposes: (namespace, name).
FAST = [(mx.fast, n) for n in ("rms_norm", "layer_norm", "rope", "scaled_dot_product_attention")] + [
    (mx, "dequantize")]
KINDS = ("attention", "dense MLP", "MoE", "rest", "sampler")


def primitives(output) -> collections.Counter:
    """Primitive nodes in the lazy graph of `output` (an array or a list of them), by name."""
    with tempfile.NamedTemporaryFile("w+", suffix=".dot") as f:
        mx.export_to_dot(f.name, output)
        return collections.Counter(re.findall(r'\[label ="([^"]+)", shape=rectangle\]', open(f.name).read()))


@contextlib.contextmanager
def fast_ops_counted_once():
    """While active, each `mx.fast` call is recorded in the yielded Counter with the nodes its
    decomposition adds on this backend (measured by rebuilding the call on evaluated stand-ins), so
    `kernels()` can count it as the one kernel it is on a GPU."""
    fallback = collections.Counter()
    originals = {(space, name): getattr(space, name) for space, name in FAST}

    def counted(name, op):
        def call(*args, **kwargs):
            stand_in = [mx.zeros(a.shape, a.dtype) if isinstance(a, mx.array) else a for a in args]
            kw = {k: mx.zeros(v.shape, v.dtype) if isinstance(v, mx.array) else v for k, v in kwargs.items()}
            mx.eval([a for a in stand_in + list(kw.values()) if isinstance(a, mx.array)])
            fallback.update(primitives(op(*stand_in, **kw)))
            fallback[name] -= 1
            return op(*args, **kwargs)
        return call

    try:
        for (space, name), op in originals.items():
            setattr(space, name, counted(name, op))
        yield fallback
    finally:
        for (space, name), op in originals.items():
            setattr(space, name, op)


def kernels(nodes: collections.Counter, fallback: collections.Counter) -> collections.Counter:
    """Nodes a GPU would launch: not views, each mx.fast call once."""
    out = collections.Counter(nodes)
    out.subtract(fallback)
    return collections.Counter({k: v for k, v in out.items() if v > 0 and k not in VIEWS})


class Spy(nn.Module):
    """Wraps a layer's attention or MLP: evaluates its inputs, counts the graph it adds, evaluates it."""

    def __init__(self, inner: nn.Module, kind: str, tally: dict):
        super().__init__()
        self.inner, self._kind, self._tally = inner, kind, tally

    def __call__(self, *args, **kwargs):
        mx.eval([a for a in args if isinstance(a, mx.array)])
        with fast_ops_counted_once() as fallback:
            out = self.inner(*args, **kwargs)
        nodes = primitives(out)
        self._tally[self._kind][0].update(nodes)
        self._tally[self._kind][1].update(kernels(nodes, fallback))
        mx.eval(out)
        return out


def decoder_layers(name: str, model) -> list:
    return model.layers if name == "mlx-deepseek" else model.model.layers


def load_runner(name: str, folder: Path):
    """(model, make_cache) of one runner."""
    if name == "mlx-lm":
        import mlx_lm
        from mlx_lm.models.cache import make_prompt_cache

        model, _ = mlx_lm.load(str(folder))
        return model, lambda: make_prompt_cache(model)
    from mlx_deepseek import load_model

    model = load_model(folder)
    return model, model.make_cache


def count_step(name: str, folder: Path, context: int) -> dict:
    """{kind: (nodes, kernels)} for one decode step, and the step's totals."""
    from mlx_lm.sample_utils import make_sampler  # both runners sample with it

    model, make_cache = load_runner(name, folder)
    prompt = mx.arange(context)[None] % 100

    def step(cache):
        logits = model(mx.array([[7]]), cache=cache)[:, -1]
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    cache = make_cache()
    mx.eval(model(prompt, cache=cache))
    with fast_ops_counted_once() as fallback:
        logits = step(cache)
    nodes = primitives(logits)
    out = {"total": (nodes, kernels(nodes, fallback))}

    cache = make_cache()
    mx.eval(model(prompt, cache=cache))
    tally = {k: (collections.Counter(), collections.Counter()) for k in KINDS}
    for layer in decoder_layers(name, model):
        kind = "MoE" if "gate" in layer.mlp else "dense MLP"
        layer.self_attn = Spy(layer.self_attn, "attention", tally)
        layer.mlp = Spy(layer.mlp, kind, tally)
    logits = step(cache)
    mx.eval(logits)
    for kind in ("attention", "dense MLP", "MoE"):
        out[kind] = tally[kind]
    out["rest"] = tuple(total - (tally["attention"][i] + tally["dense MLP"][i] + tally["MoE"][i])
                        for i, total in enumerate(out["total"]))
    for label, sampler in (("sampler (greedy)", make_sampler(0.0)),
                           ("sampler (temp, top-p)", make_sampler(0.7, top_p=0.9))):
        mx.eval(sampler(logits))  # its compiled parts are traced on the first call
        nodes = primitives(sampler(logits))
        out[label] = (nodes, kernels(nodes, collections.Counter()))
    return {kind: [sum(n.values()), sum(k.values())] for kind, (n, k) in out.items()} | {
        "kernels by name": dict(out["total"][1].most_common())}


def decode_speed(name: str, folder: Path, context: int, tokens: int) -> dict:
    """Greedy tokens and tok/s of `tokens` decode steps after a `context`-token prompt."""
    from bench.common import greedy

    model, make_cache = load_runner(name, folder)
    prompt = mx.arange(context) % 100
    greedy(model, make_cache(), prompt, 4)  # warm-up: kernels compiled, memory allocated
    cache = make_cache()
    mx.eval(model(prompt[None], cache=cache))
    out = []
    seconds = timed(lambda: out.extend(greedy(model, cache, mx.array([7]), tokens)))
    return {"tokens": out, "tok_s": tokens / seconds}


# Runs this module's main in a fresh process; with `code`, that checkout's mlx_deepseek is imported
# first (this file's bench stays), so an earlier commit is measured with today's instruments.
_IN_CHECKOUT = """
import sys
code = sys.argv[1]
sys.path.insert(0, code)
import mlx_deepseek
sys.path.remove(code)
from bench.primitives import main
sys.exit(main(sys.argv[2:]))
"""


def in_process(args: list[str], code: str | None = None):
    """The JSON a hidden mode (`--time RUNNER` or `--count`) prints, from a fresh process."""
    head = [sys.executable, "-c", _IN_CHECKOUT, str(Path(code).resolve())] if code else [
        sys.executable, "-m", "bench.primitives"]
    done = subprocess.run(head + args, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


MODELS = {"tinyseek": ("tinyseek", 2, 16, None, None),  # 1 dense + 1 MoE layer
          "DeepSeek-V2-Lite": ("DeepSeek-V2-Lite", 2, 16, 8192, 1),
          "DeepSeek-V3": ("DeepSeek-V3", 2, 16, 8192, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64, help="decode steps timed per run")
    p.add_argument("--reps", type=int, default=3, help="alternating timed runs per runner")
    p.add_argument("--models", default="tinyseek,DeepSeek-V2-Lite", help=f"of {', '.join(MODELS)}")
    p.add_argument("--before", help="a checkout of an earlier mlx-deepseek, timed beside the current one")
    p.add_argument("--time", help=argparse.SUPPRESS)  # hidden modes: one runner, in this process
    p.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.time:
        print(json.dumps(decode_speed(a.time, Path(a.folder), a.context, a.tokens)))
        return 0
    if a.count:
        print(json.dumps(count_step("mlx-deepseek", Path(a.folder), a.context)))
        return 0

    runners = [("mlx-deepseek", None), ("mlx-lm", None)] + ([("mlx-deepseek before", a.before)] if a.before else [])
    report = {"machine": machine(), "context": a.context, "tokens": a.tokens, "models": {}}
    for model_name in a.models.split(","):
        folder = converted(*MODELS[model_name])
        entry = report["models"][model_name] = {"folder": folder.name, "counts": {}, "tok_s": {}}
        for name in ("mlx-deepseek", "mlx-lm"):
            entry["counts"][name] = count_step(name, folder, a.context)
        if a.before:
            entry["counts"]["mlx-deepseek before"] = in_process(
                ["--count", "--folder", str(folder), "--context", str(a.context)], a.before)
        runs = collections.defaultdict(list)
        timing = ["--folder", str(folder), "--context", str(a.context), "--tokens", str(a.tokens)]
        for _ in range(a.reps):
            for name, code in runners:
                runs[name].append(in_process(["--time", name.split(" ")[0]] + timing, code))
        first = runs["mlx-deepseek"][0]["tokens"]
        for name, results in runs.items():
            if any(r["tokens"] != first for r in results):
                raise SystemExit(f"{model_name}: {name}'s greedy tokens differ from mlx-deepseek's")
            entry["tok_s"][name] = summary([r["tok_s"] for r in results])
        print_tables(model_name, entry, a.context)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "primitives.json").write_text(json.dumps(report, indent=1))
    return 0


def print_tables(model_name: str, entry: dict, context: int) -> None:
    counts = entry["counts"]
    print(f"\n{model_name} ({entry['folder']}), one decode step at context {context}: kernels (nodes on this backend)\n")
    print("| part | " + " | ".join(counts) + " |")
    print("|---|" + "---:|" * len(counts))
    for kind in ("total",) + KINDS[:-1] + ("sampler (greedy)", "sampler (temp, top-p)"):
        cells = [f"{c[kind][1]} ({c[kind][0]})" if kind in c else "" for c in counts.values()]
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print("\n| runner | decode tok/s (median) | min | max |")
    print("|---|---:|---:|---:|")
    for name, s in entry["tok_s"].items():
        print(f"| {name} | {s['median']:.1f} | {s['min']:.1f} | {s['max']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
