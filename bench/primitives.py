"""MLX primitives one decode step evaluates (on an Apple GPU each is about one kernel launch),
mlx-deepseek against mlx-lm on the same converted checkpoint, by primitive name.

The graph of one step's logits (a cache already holding `context` tokens) is written with
`mx.export_to_dot` and its primitive nodes are counted; nothing is evaluated but the cache.

    python -m bench.primitives [--context 64]
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile

import mlx.core as mx

from bench.common import converted, load_both


def primitives(output: mx.array) -> collections.Counter:
    """Primitive nodes in the lazy graph of `output`, by name."""
    with tempfile.NamedTemporaryFile("w+", suffix=".dot") as f:
        mx.export_to_dot(f.name, output)
        return collections.Counter(re.findall(r'\[label ="([^"]+)", shape=rectangle\]', open(f.name).read()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=64)
    a = p.parse_args(argv)
    folder = converted("tinyseek", 2, 16, None, None)  # 1 dense + 1 MoE layer
    counts = {}
    for name, model, make in load_both(folder):
        cache = make()
        mx.eval(model(mx.arange(a.context)[None] % 100, cache=cache))
        counts[name] = primitives(model(mx.array([[7]]), cache=cache))
    names = sorted(set().union(*counts.values()), key=lambda k: -sum(c[k] for c in counts.values()))
    print(f"\nPrimitives per decode step, {folder.name} (1 dense + 1 MoE layer), context {a.context}\n")
    print("| primitive | " + " | ".join(counts) + " |")
    print("|---|" + "---:|" * len(counts))
    print("| **total** | " + " | ".join(str(sum(c.values())) for c in counts.values()) + " |")
    for k in names:
        print(f"| {k} | " + " | ".join(str(c[k]) for c in counts.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
