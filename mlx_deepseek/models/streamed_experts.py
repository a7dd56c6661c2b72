"""Routed experts that live on disk: a fixed pool of expert slots, filled on demand, run as usual.

Stands in for `RoutedExperts` (same call: x (..., D), indices (..., k) -> (..., k, D)). Its `slots`
are a `RoutedExperts` of S experts (quantized like the checkpoint's experts); the router's picks
are brought to the host (one synchronization per MoE layer per forward call), `ExpertPool` says
which experts go to which slots, `fetch` (I/O, given by the loader) reads the missing ones, they
are written into the slots, and the picks, remapped to slot indices, go through the very same
`dispatch` + gather_qmm / gather_mm as resident experts: each token-expert pair's output is the
resident one bit for bit.

A call that needs more experts than there are slots (a long prefill chunk) runs in rounds: each
round loads its experts and computes only the pairs that belong to them, while the next round's
experts are read.
"""

from __future__ import annotations

import time
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .expert_pool import ExpertPool
from .moe import RoutedExperts, dispatch

# expert ids -> the wait for {"gate_proj.weight": (m, ...) array, ...}: the experts' tensors in the
# order asked (the reads run in the background until waited for)
Fetch = Callable[[list[int]], Callable[[], dict[str, mx.array]]]


class StreamedExperts(nn.Module):
    def __init__(self, dims: int, hidden: int, slots: int, pool: ExpertPool, fetch: Fetch,
                 limit: float = 0.0, count_tokens: bool = False):
        super().__init__()
        self.slots = RoutedExperts(dims, hidden, slots, limit)
        self._pool, self._fetch, self._count_tokens = pool, fetch, count_tokens

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        picks = np.array(indices)  # the router's picks on the host: the one synchronization
        stats = self._pool.stats
        stats.syncs += 1
        if self._count_tokens:
            stats.tokens += picks.size // picks.shape[-1]
        rounds = self._pool.plan(picks)
        if len(rounds) == 1:
            self._install(rounds[0].loads, self._start(rounds[0].loads))
            return dispatch(x, mx.array(rounds[0].slot_of[picks].astype(np.uint32)), self.slots.swiglu)
        k, D = picks.shape[-1], x.shape[-1]
        flat, rows = picks.reshape(-1), x.reshape(-1, D)
        pieces, positions = [], []
        pending = self._start(rounds[0].loads)
        for i, r in enumerate(rounds):
            self._install(r.loads, pending)
            # the next round's reads run while this round computes
            pending = self._start(rounds[i + 1].loads) if i + 1 < len(rounds) else None
            pos = np.flatnonzero(np.isin(flat, r.experts))
            y = dispatch(rows[mx.array(pos // k)], mx.array(r.slot_of[flat[pos]][:, None].astype(np.uint32)),
                         self.slots.swiglu)
            mx.eval(y)  # before the next round rewrites the slots (so their buffers are updated in place)
            pieces.append(y[:, 0])
            positions.append(pos)
        order = np.argsort(np.concatenate(positions))
        return mx.concatenate(pieces)[mx.array(order)].reshape(*picks.shape, D)

    def _start(self, loads: list[tuple[int, int]]):
        return self._fetch([e for e, _ in loads]) if loads else None

    def _install(self, loads: list[tuple[int, int]], pending) -> None:
        """Wait for the reads of `loads` and write them into their slots."""
        if pending is None:
            return
        start = time.perf_counter()
        data = pending()
        self._pool.stats.read_s += time.perf_counter() - start
        for name, value in data.items():
            proj, part = name.split(".")
            pool = getattr(self.slots, proj)[part]
            for i, (_, s) in enumerate(loads):
                pool[s] = value[i]  # slice updates (in place once evaluated; faster than a scatter)
