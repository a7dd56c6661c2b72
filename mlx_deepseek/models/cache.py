"""The latent KV cache: per token and layer, only the normalized compressed latent (`kv_lora_rank`
values) and the RoPE'd shared key (`qk_rope_head_dim` values) -- for V2 as for V3.

It follows mlx-lm's cache protocol (`update_and_fetch`, `offset`, `state`, `meta_state`, `trim`,
`is_trimmable`, `nbytes`), with the latent in the role of keys and the RoPE key in the role of
values. Storage grows in steps of `step` tokens and is written in place, never re-concatenated per
token. `QuantizedLatentCache` stores the latent in 8 or 4 bits (attention then runs on it with
`mx.quantized_matmul`, never dequantizing the history); the RoPE key stays in the model dtype.

DeepSeek-V3.2 adds one more array per token and layer: the lightning indexer's key (`index_head_dim`
values, in the model dtype in both caches), appended, trimmed, saved and loaded with the latents as
the last array of `state`.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .config import ModelArgs


def latent_bytes_per_token(args: ModelArgs, dtype: mx.Dtype, bits: Optional[int] = None, group_size: int = 64) -> int:
    """Bytes one token costs in one layer's cache: the design's memory figure."""
    index = args.index_head_dim * dtype.size if args.sparse else 0  # V3.2's indexer key
    if bits is None:
        return (args.kv_lora_rank + args.qk_rope_head_dim) * dtype.size + index
    groups = args.kv_lora_rank // group_size
    return args.kv_lora_rank * bits // 8 + 2 * groups * dtype.size + args.qk_rope_head_dim * dtype.size + index


class LatentCache:
    step = 256

    def __init__(self):
        self.buffers: Optional[list[mx.array]] = None  # each (B, 1, capacity, width)
        self.offset = 0

    def update_and_fetch(self, latent: mx.array, rope_key: mx.array, *index_key: mx.array) -> tuple[mx.array, ...]:
        """Append L tokens ((B, 1, L, .) each; V3.2 also passes its indexer key); return everything
        held, (B, 1, offset + L, .) each."""
        return tuple(self._append([latent, rope_key, *index_key]))

    def _append(self, arrays: list[mx.array]) -> list[mx.array]:
        start, length = self.offset, arrays[0].shape[2]
        if self.buffers is None or start + length > self.capacity:
            self._grow(arrays, length)
        for buffer, a in zip(self.buffers, arrays):
            buffer[..., start : start + length, :] = a
        self.offset = start + length
        return [b[..., : self.offset, :] for b in self.buffers]

    def _grow(self, arrays: list[mx.array], length: int) -> None:
        extra = (length + self.step - 1) // self.step * self.step
        new = [mx.zeros((*a.shape[:2], extra, a.shape[-1]), a.dtype) for a in arrays]
        if self.buffers is None:
            self.buffers = new
        else:
            self.buffers = [mx.concatenate([b[..., : self.offset, :], n], axis=2) for b, n in zip(self.buffers, new)]

    def empty(self) -> bool:
        return self.buffers is None

    def size(self) -> int:
        return self.offset

    @property
    def capacity(self) -> int:
        return 0 if self.buffers is None else self.buffers[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated: `capacity * latent_bytes_per_token` per batch row."""
        return 0 if self.buffers is None else sum(b.nbytes for b in self.buffers)

    @property
    def state(self) -> tuple[mx.array, ...] | list:
        if self.buffers is None:
            return []
        return tuple(b[..., : self.offset, :] for b in self.buffers)

    @state.setter
    def state(self, value) -> None:
        if not value:
            self.buffers, self.offset = None, 0
            return
        self.buffers = list(value)
        self.offset = self.buffers[0].shape[2]

    @property
    def meta_state(self) -> str:
        return ""

    @meta_state.setter
    def meta_state(self, value) -> None:
        if value:
            raise ValueError(f"LatentCache keeps no meta state, got {value!r}")

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Forget the last n tokens (rewind); returns how many were forgotten."""
        n = min(self.offset, n)
        self.offset -= n
        return n


class QuantizedLatentCache(LatentCache):
    """The latent in `bits`-bit affine groups of `group_size` along kv_lora_rank; state is
    (latent words, scales, biases, rope key)."""

    def __init__(self, bits: int = 8, group_size: int = 64):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"kv_bits must be 4 or 8, got {bits}")
        self.bits, self.group_size = bits, group_size

    def update_and_fetch(self, latent: mx.array, rope_key: mx.array, *index_key: mx.array):
        """Returns ((words, scales, biases), rope_key[, index_key]) of everything held."""
        words, scales, biases, *rest = self._append([*mx.quantize(latent, self.group_size, self.bits), rope_key,
                                                     *index_key])
        return ((words, scales, biases), *rest)

    @property
    def meta_state(self) -> str:
        return f"{self.bits},{self.group_size}"

    @meta_state.setter
    def meta_state(self, value) -> None:
        self.bits, self.group_size = map(int, value.split(","))


def make_latent_cache(kv_bits: Optional[int] = None, kv_group_size: int = 64) -> LatentCache:
    return LatentCache() if kv_bits is None else QuantizedLatentCache(kv_bits, kv_group_size)


class BatchLatentCache:
    """One layer's latent caches of B sequences of different lengths, decoded together.

    Rows are right-padded in one buffer per array, (B, 1, capacity, width); row b holds
    `lengths[b]` tokens. `offset` is the per-row position array RoPE takes, and `key_mask` tells
    attention which keys of the padded history each row may see. Built from per-sequence caches
    (`from_caches`), and back to one (`extract`) when a sequence leaves the batch. Only one new
    token per row per call (decoding); prompts are prefilled on their own cache first.
    """

    step = 256

    def __init__(self, buffers: list[mx.array], lengths: list[int], bits: Optional[int] = None,
                 group_size: int = 64):
        self.buffers, self.lengths = buffers, list(lengths)
        self.bits, self.group_size = bits, group_size

    @classmethod
    def from_caches(cls, caches: list[LatentCache]) -> "BatchLatentCache":
        first = caches[0]
        bits = getattr(first, "bits", None)
        if any(getattr(c, "bits", None) != bits for c in caches):
            raise ValueError("a batch needs caches of one kind (all plain or all with the same kv_bits)")
        lengths = [c.offset for c in caches]
        capacity = (max(lengths) // cls.step + 1) * cls.step
        parts = [c.state for c in caches]
        buffers = []
        for j in range(len(parts[0])):
            rows = [mx.pad(p[j], [(0, 0), (0, 0), (0, capacity - p[j].shape[2]), (0, 0)]) for p in parts]
            buffers.append(mx.concatenate(rows, axis=0))
        return cls(buffers, lengths, bits, getattr(first, "group_size", 64))

    def extract(self, row: int) -> LatentCache:
        """Row `row` as a cache of its own (a copy of its tokens)."""
        c = make_latent_cache(self.bits, self.group_size)
        one = lambda x: mx.array(1, x.dtype)  # noqa: E731
        # times one: a buffer of its own, so the batch's buffers are not kept alive through it
        c.state = [b[row : row + 1, :, : self.lengths[row], :] * one(b) for b in self.buffers]
        return c

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows, in this order."""
        index = mx.array(rows)
        self.buffers = [b[index] for b in self.buffers]
        self.lengths = [self.lengths[r] for r in rows]

    def extend(self, other: "BatchLatentCache") -> None:
        """Append another batch's rows (sequences joining between steps)."""
        capacity = max(self.capacity, other.capacity)
        pad = lambda b: mx.pad(b, [(0, 0), (0, 0), (0, capacity - b.shape[2]), (0, 0)])  # noqa: E731
        self.buffers = [mx.concatenate([pad(a), pad(b)], axis=0) for a, b in zip(self.buffers, other.buffers)]
        self.lengths += other.lengths

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]

    @property
    def offset(self) -> mx.array:
        return mx.array(self.lengths)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def update_and_fetch(self, latent: mx.array, rope_key: mx.array, *index_key: mx.array):
        if latent.shape[2] != 1:
            raise ValueError("a batch cache takes one new token per row; prefill each prompt on its own cache")
        latents = mx.quantize(latent, self.group_size, self.bits) if self.bits else [latent]
        arrays = [*latents, rope_key, *index_key]
        if max(self.lengths) + 1 > self.capacity:
            grow = [mx.zeros((*b.shape[:2], self.step, b.shape[3]), b.dtype) for b in self.buffers]
            self.buffers = [mx.concatenate([b, g], axis=2) for b, g in zip(self.buffers, grow)]
        rows, at = mx.arange(len(self.lengths)), mx.array(self.lengths)
        for b, a in zip(self.buffers, arrays):
            b[rows, 0, at] = a[:, 0, 0]
        self.lengths = [n + 1 for n in self.lengths]
        held = [b[..., : max(self.lengths), :] for b in self.buffers]
        return (tuple(held[:3]), *held[3:]) if self.bits else tuple(held)

    def key_mask(self) -> mx.array:
        """(B, T) boolean: which of the padded keys each row's new token attends to."""
        T = max(self.lengths)
        return mx.arange(T)[None] < mx.array(self.lengths)[:, None]
