"""Which routed experts sit in a layer's slots: bookkeeping for experts streamed from disk (no math, no I/O).

A layer keeps `slots` of its `experts` in memory. Each forward call brings the router's picks (on
the host: the one synchronization per MoE layer); `plan` turns them into rounds, each a set of at
most `slots` experts to hold at once, with the loads (expert -> slot) that bring the missing ones
in. One round when the call needs no more experts than there are slots (always in decoding when
slots >= top_k); a prefill chunk that needs more runs its experts in rounds, each expert loaded once.

Eviction, among the slots whose expert the current round does not need (free slots first):
- `lru`: the expert used longest ago;
- `lfu` (frequency-aware, the default of `load`): the expert with the fewest token picks so far,
  the oldest on ties; on tinyseek it hits 0.2-2.5 points more often than LRU (bench/experts_on_disk.py);
- `pinned` experts (from a calibration run's counts) are never evicted once loaded; the rest LRU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

POLICIES = ("lru", "lfu")


@dataclass
class ExpertStats:
    """Counters of every streamed layer together. `picks` are distinct experts a layer needed in one
    forward call (in decoding with one sequence: the router's top_k); each is a hit (already in a
    slot) or a miss (read from disk): hits + misses == picks, bytes_read == misses x expert bytes."""
    picks: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    pairs: int = 0    # token-expert pairs computed
    syncs: int = 0    # host synchronizations on the router's picks (one per MoE layer per forward call)
    rounds: int = 0   # expert rounds run (more than one per call when a chunk needs more experts than slots)
    tokens: int = 0   # tokens through one streamed layer (each forward call passes all of them)
    read_s: float = 0.0  # seconds spent waiting for reads

    @property
    def hit_rate(self) -> float:
        return self.hits / self.picks if self.picks else 0.0

    @property
    def gb_per_token(self) -> float:
        return self.bytes_read / self.tokens / 1e9 if self.tokens else 0.0

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, type(getattr(self, name))())

    def summary(self) -> str:
        return (f"experts: {self.hit_rate:.0%} hits, {self.gb_per_token:.3f} GB read per token, "
                f"{self.syncs / max(self.tokens, 1):.1f} syncs per token")


@dataclass
class Round:
    experts: np.ndarray              # the experts this round computes (sorted)
    loads: list[tuple[int, int]]     # (expert, slot) to read before it runs
    slot_of: np.ndarray = field(repr=False)  # expert -> slot at the time of this round (-1: absent)


class ExpertPool:
    """Slot assignment for one layer. `plan(picks)` -> rounds; the caller performs each round's
    loads before computing it (the pool assumes they happened)."""

    def __init__(self, experts: int, slots: int, expert_bytes: int, stats: ExpertStats, policy: str = "lru",
                 pinned: Sequence[int] = ()):
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy {policy!r}: expected one of {list(POLICIES)}")
        if not 1 <= slots <= experts:
            raise ValueError(f"expert slots: {slots}, expected 1..{experts}")
        self.experts, self.slots, self.expert_bytes = experts, slots, expert_bytes
        self.stats, self.policy = stats, policy
        self.slot_of = np.full(experts, -1, dtype=np.int64)  # expert -> slot
        self.held = np.full(slots, -1, dtype=np.int64)       # slot -> expert
        self.last_use = np.zeros(experts, dtype=np.int64)
        self.uses = np.zeros(experts, dtype=np.int64)
        self.pinned = np.zeros(experts, dtype=bool)
        self.pinned[list(pinned)] = True
        if self.pinned.sum() >= slots:
            raise ValueError(f"{int(self.pinned.sum())} pinned experts leave no free slot of {slots}")
        self.clock = 0

    def plan(self, picks: np.ndarray) -> list[Round]:
        needed, counts = np.unique(picks, return_counts=True)
        if needed.size and (needed[0] < 0 or needed[-1] >= self.experts):
            raise ValueError(f"router picked expert {needed[0] if needed[0] < 0 else needed[-1]}, "
                             f"the layer has {self.experts}")
        self.clock += 1
        hit = self.slot_of[needed] >= 0
        self.stats.picks += needed.size
        self.stats.hits += int(hit.sum())
        self.stats.misses += int((~hit).sum())
        self.stats.bytes_read += int((~hit).sum()) * self.expert_bytes
        self.stats.pairs += int(picks.size)
        self.uses[needed] += counts
        # Hits first (all of them fit: they are in slots now), then the misses, as many at a time
        # as the slots that pinned experts this call does not need leave.
        order = np.concatenate([needed[hit], needed[~hit]])
        idle = self.pinned & (self.slot_of >= 0)
        idle[needed] = False
        size = self.slots - int(idle.sum())
        rounds = []
        for start in range(0, order.size, size):
            group = order[start : start + size]
            loads = self._place(group)
            self.last_use[group] = self.clock
            rounds.append(Round(np.sort(group), loads, self.slot_of.copy()))
        self.stats.rounds += len(rounds)
        return rounds

    def _place(self, group: np.ndarray) -> list[tuple[int, int]]:
        missing = [int(e) for e in group if self.slot_of[e] < 0]
        if not missing:
            return []
        keep = np.zeros(self.slots, dtype=bool)
        present = self.slot_of[group]
        keep[present[present >= 0]] = True
        held = self.held
        free = np.flatnonzero((held < 0) & ~keep)
        taken = np.flatnonzero((held >= 0) & ~keep & ~self.pinned[np.maximum(held, 0)])
        if self.policy == "lfu":
            rank = np.lexsort((self.last_use[held[taken]], self.uses[held[taken]]))
        else:
            rank = np.argsort(self.last_use[held[taken]], kind="stable")
        victims = np.concatenate([free, taken[rank]])[: len(missing)]
        if victims.size < len(missing):  # cannot happen: the group fits beside the pinned ones
            raise RuntimeError("internal error: no slot left for a missing expert")
        loads = []
        for e, s in zip(missing, victims.tolist()):
            if held[s] >= 0:
                self.slot_of[held[s]] = -1
            held[s] = e
            self.slot_of[e] = s
            loads.append((e, s))
        return loads
