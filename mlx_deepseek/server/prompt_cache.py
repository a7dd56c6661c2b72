"""Latent caches of many conversations, kept between requests within a byte budget.

Each entry is the token ids a finished request's cache holds (its prompt and reply) and one
`LatentCache` per layer. A new prompt starts from the entry sharing its longest prefix: a returning
conversation prefills only what is new. Storing an entry drops the entries it extends (a
conversation's earlier turns); the least recently used go first when the budget is exceeded.
Entries are plain arrays and never change: a request works on a copy of the prefix it reuses.

Optional persistence (`directory`): entries are written as the validated cache files
`PromptCache.save` writes (refused on load when saved with another model), so a restart keeps the
warm conversations.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from ..models.cache import LatentCache


@dataclass
class Entry:
    tokens: np.ndarray
    caches: list[LatentCache]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def copy_prefix(cache: LatentCache, length: int) -> LatentCache:
    """A new cache holding the first `length` tokens of `cache` (which stays as it is)."""
    out = type(cache).__new__(type(cache))
    out.__dict__.update(cache.__dict__)
    out.state = [a[..., :length, :] for a in cache.state] if length else []
    return out


class PromptStore:
    def __init__(self, budget_bytes: int, directory: Optional[str] = None, prompt_cache_factory=None):
        self.budget = int(budget_bytes)
        self.entries: "OrderedDict[int, Entry]" = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()  # the generation thread writes; /health reads
        self.directory = Path(directory) if directory else None
        self._factory = prompt_cache_factory  # () -> generate.PromptCache, for files on disk
        self.hits = self.lookups = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def take(self, tokens: Sequence[int]) -> tuple[Optional[list[LatentCache]], int]:
        """Copies of the caches of the longest stored prefix of `tokens` (leaving at least one
        token to run) and its length; (None, 0) when nothing is shared."""
        prompt = np.asarray(tokens, dtype=np.int64)
        best, length = None, 0
        with self._lock:
            self.lookups += 1
            for key, e in self.entries.items():
                n = common_prefix(e.tokens, prompt)
                if n > length:
                    best, length = key, n
            length = min(length, len(prompt) - 1)
            if best is None or length <= 0:
                return None, 0
            self.entries.move_to_end(best)
            self.hits += 1
            return [copy_prefix(c, length) for c in self.entries[best].caches], length

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether an entry holds all of `tokens` (as its prefix)."""
        prompt = np.asarray(tokens, dtype=np.int64)
        with self._lock:
            return any(common_prefix(e.tokens, prompt) == len(prompt) for e in self.entries.values())

    def put(self, tokens: Sequence[int], caches: list[LatentCache]) -> None:
        """Keep a finished request's cache (`tokens` are what it holds)."""
        if not tokens:
            return
        entry = Entry(np.asarray(tokens, dtype=np.int64), caches)
        if entry.nbytes > self.budget:
            return
        with self._lock:
            for key in [k for k, e in self.entries.items()
                        if len(e.tokens) <= len(entry.tokens) and common_prefix(e.tokens, entry.tokens) == len(e.tokens)]:
                self._drop(key)
            self.entries[self._next] = entry
            self._next += 1
            total = sum(e.nbytes for e in self.entries.values())
            while total > self.budget:
                key, old = next(iter(self.entries.items()))
                total -= old.nbytes
                self._drop(key)
        if self.directory is not None:
            self._write(entry)

    def _drop(self, key: int) -> None:
        e = self.entries.pop(key)
        if self.directory is not None:
            self._file(e.tokens).unlink(missing_ok=True)

    # -- persistence ----------------------------------------------------------------------------
    def _file(self, tokens: np.ndarray) -> Path:
        return self.directory / (hashlib.sha1(tokens.astype(np.int64).tobytes()).hexdigest()[:20] + ".safetensors")

    def _write(self, entry: Entry) -> None:
        pc = self._factory()
        pc.cache, pc.tokens = entry.caches, entry.tokens.tolist()
        self.directory.mkdir(parents=True, exist_ok=True)
        pc.save(self._file(entry.tokens))

    def load_directory(self) -> int:
        """Read the cache files of an earlier run (those of this model); returns how many."""
        from ..generate import CacheFileError

        if self.directory is None or not self.directory.is_dir():
            return 0
        files = sorted(self.directory.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
        loaded = 0
        for path in files:
            pc = self._factory()
            try:
                pc.load(path)
            except CacheFileError:
                continue
            entry = Entry(np.asarray(pc.tokens, dtype=np.int64), pc.cache)
            if entry.nbytes <= self.budget - sum(e.nbytes for e in self.entries.values()):
                mx.eval([c.state for c in entry.caches])
                self.entries[self._next] = entry
                self._next += 1
                loaded += 1
        return loaded
