"""DeepSeek-V4's per-layer cache, and how it rewinds exactly.

Per layer it holds
- `window`: the last sliding_window - 1 keys (= values) of the shared head, (B, 1, <= W-1, head_dim);
  with the new token(s) they are the W keys a query sees;
- for a compressed layer, one `CompressorState` (and a second one for a CSA layer's indexer):
  the compressed entries emitted so far (append-only, one per `ratio` tokens), and the partial
  window: the projections of the tokens since the last complete window (and, for overlapping CSA
  windows, the previous complete window's first half).

The window and the partial windows are lost state: a plain trim cannot rewind them. They are held
in arrays that are replaced, never written in place, so `snapshot()` is a handful of references
(no copy) and `restore()` brings back exactly that moment; the compressed entries are append-only,
so a restored count makes later entries invisible until they are written again. A rewind to a
position between snapshots restores the latest snapshot before it and re-runs the tokens in
between (`PromptCache` does that and counts them).

Values per token, asymptotically: a CSA layer keeps head_dim/4 + index_head_dim/4 (160 for
Flash), an HCA layer head_dim/128 (4); the windows and partial windows are a constant.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Optional

import mlx.core as mx

from .config import V4Args


@dataclass
class CompressorState:
    ratio: int
    width: int                             # values per compressed entry
    entries: Optional[mx.array] = None     # (B, capacity, width); rows [:count] are valid
    count: int = 0
    pending_kv: Optional[mx.array] = None  # (B, r < ratio, coff * width) float32, since the last window
    pending_gate: Optional[mx.array] = None
    prev_kv: Optional[mx.array] = None     # (B, ratio, width): first half of the last window (overlap)
    prev_gate: Optional[mx.array] = None   # its gate scores, position bias added
    step = 1024

    def append(self, new: mx.array) -> mx.array:
        """Append entries (B, n, width); return all valid ones (B, count, width)."""
        n = new.shape[1]
        if n:
            if self.entries is None or self.count + n > self.entries.shape[1]:
                grow = (n + self.step - 1) // self.step * self.step
                fresh = mx.zeros((new.shape[0], grow, self.width), new.dtype)
                self.entries = fresh if self.entries is None else mx.concatenate(
                    [self.entries[:, : self.count], fresh], axis=1)
            self.entries[:, self.count : self.count + n] = new
            self.count += n
        if self.entries is None:
            return mx.zeros((new.shape[0], 0, self.width), new.dtype)
        return self.entries[:, : self.count]

    @property
    def nbytes(self) -> int:
        held = [self.pending_kv, self.pending_gate, self.prev_kv, self.prev_gate]
        entry = 0 if self.entries is None else self.count * self.width * self.entries.dtype.size * self.entries.shape[0]
        return entry + sum(a.nbytes for a in held if a is not None)


class V4LayerCache:
    def __init__(self, window: int, ratio: int = 0, head_dim: int = 512, index_dim: int = 0):
        self.window_size, self.head_dim = window, head_dim
        self.offset = 0
        self.window: Optional[mx.array] = None
        self.compressor = CompressorState(ratio, head_dim) if ratio else None
        self.indexer = CompressorState(ratio, index_dim) if ratio == 4 and index_dim else None

    def update_window(self, kv: mx.array) -> mx.array:
        """kv (B, 1, L, D) of the new tokens -> the keys they see: held window + new, (B, 1, w + L, D)."""
        keys = kv if self.window is None else mx.concatenate([self.window, kv], axis=2)
        self.window = keys[:, :, -(self.window_size - 1):] if self.window_size > 1 else keys[:, :, :0]
        return keys

    def snapshot(self, settled: bool = False) -> tuple:
        """The state at this moment, by reference (nothing is copied). (`settled` matters only to
        a pipeline's stand-in for other ranks' caches, which mirrors the snapshot rule there.)"""
        return (self.offset, self.window,
                *(replace(s) if s is not None else None for s in (self.compressor, self.indexer)))

    def restore(self, snap: tuple) -> None:
        self.offset, self.window, compressor, indexer = snap
        # keep our entry buffers (they may have grown since); the count decides what is valid
        for mine, saved in ((self.compressor, compressor), (self.indexer, indexer)):
            if mine is not None:
                entries = mine.entries
                mine.__dict__.update(saved.__dict__)
                if entries is not None and (saved.entries is None or entries.shape[1] >= saved.entries.shape[1]):
                    mine.entries = entries

    @property
    def nbytes(self) -> int:
        total = 0 if self.window is None else self.window.nbytes
        return total + sum(s.nbytes for s in (self.compressor, self.indexer) if s is not None)

    PARTS = ("entries", "pending_kv", "pending_gate", "prev_kv", "prev_gate")

    def _held(self) -> list[tuple[str, mx.array]]:
        held = [] if self.window is None else [("window", self.window)]
        for name, s in (("compressor", self.compressor), ("indexer", self.indexer)):
            if s is None:
                continue
            for part in self.PARTS:
                a = getattr(s, part)
                if a is not None:
                    held.append((f"{name}.{part}", a[:, : s.count] if part == "entries" else a))
        return held

    @property
    def state(self) -> list[mx.array]:
        """The arrays this cache holds (for mx.eval and cache files); `meta_state` names them."""
        return [a for _, a in self._held()]

    @property
    def meta_state(self) -> str:
        return json.dumps({"kind": "v4", "offset": self.offset, "parts": [n for n, _ in self._held()]})

    def load_state(self, meta: str, arrays: list[mx.array]) -> None:
        """Inverse of (meta_state, state); raises ValueError when they do not fit this layer."""
        info = json.loads(meta)
        if not isinstance(info, dict) or info.get("kind") != "v4" or len(info.get("parts", ())) != len(arrays):
            raise ValueError("not a DeepSeek-V4 layer cache")
        self.offset = int(info["offset"])
        for name, a in zip(info["parts"], arrays):
            owner, _, part = name.partition(".")
            if owner == "window":
                self.window = a
                continue
            state = getattr(self, owner, None) if owner in ("compressor", "indexer") else None
            if state is None or part not in self.PARTS:
                raise ValueError(f"this layer has no {name}")
            setattr(state, part, a)
            if part == "entries":
                state.count = a.shape[1]
        if not self.consistent():
            raise ValueError(f"its arrays do not describe {self.offset} tokens of this layer")

    def consistent(self) -> bool:
        """Every part holds what `offset` tokens leave (a step interrupted half-way does not)."""
        held = 0 if self.window is None else self.window.shape[2]
        if held != min(self.offset, self.window_size - 1) or (self.window is not None and (
                self.window.ndim != 4 or self.window.shape[-1] != self.head_dim)):
            return False
        for s in (self.compressor, self.indexer):
            if s is None:
                continue
            coff = 2 if s.ratio == 4 else 1
            pending = 0 if s.pending_kv is None else s.pending_kv.shape[1]
            if s.count != self.offset // s.ratio or pending != self.offset % s.ratio:
                return False
            if s.entries is not None and (s.entries.ndim != 3 or s.entries.shape[-1] != s.width):
                return False
            for a in (s.pending_kv, s.pending_gate):
                if a is not None and (a.ndim != 3 or a.shape[-1] != coff * s.width):
                    return False
            if s.ratio == 4 and s.count and (s.prev_kv is None or tuple(s.prev_kv.shape[1:]) != (4, s.width)):
                return False
        return True

    # mlx-lm's cache protocol, as far as it applies
    def is_trimmable(self) -> bool:
        return False

    def empty(self) -> bool:
        return self.offset == 0

    def size(self) -> int:
        return self.offset


def make_v4_cache(args: V4Args, layers: range) -> list[V4LayerCache]:
    return [V4LayerCache(args.sliding_window, args.compress_ratio(i), args.head_dim, args.index_head_dim)
            for i in layers]


def v4_values_per_token(args: V4Args) -> int:
    """Values the cache adds per token across all main layers, once the context is long (the
    windows and partial windows are a constant): head_dim/ratio per compressed layer, plus
    index_head_dim/4 for a CSA layer's indexer."""
    total = 0
    for i in range(args.num_hidden_layers):
        r = args.compress_ratio(i)
        if r:
            total += args.head_dim // r + (args.index_head_dim // r if r == 4 else 0)
    return total
