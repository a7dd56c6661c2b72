"""The latent KV cache: per token and layer, only the normalized compressed latent (`kv_lora_rank`
values) and the RoPE'd shared key (`qk_rope_head_dim` values) -- for V2 as for V3.

It follows mlx-lm's cache protocol (`update_and_fetch`, `offset`, `state`, `meta_state`, `trim`,
`is_trimmable`, `nbytes`), with the latent in the role of keys and the RoPE key in the role of
values. Storage grows in steps of `step` tokens and is written in place, never re-concatenated per
token. `QuantizedLatentCache` stores the latent in 8 or 4 bits (attention then runs on it with
`mx.quantized_matmul`, never dequantizing the history); the RoPE key stays in the model dtype.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .config import ModelArgs


def latent_bytes_per_token(args: ModelArgs, dtype: mx.Dtype, bits: Optional[int] = None, group_size: int = 64) -> int:
    """Bytes one token costs in one layer's cache: the design's memory figure."""
    if bits is None:
        return (args.kv_lora_rank + args.qk_rope_head_dim) * dtype.size
    groups = args.kv_lora_rank // group_size
    return args.kv_lora_rank * bits // 8 + 2 * groups * dtype.size + args.qk_rope_head_dim * dtype.size


class LatentCache:
    step = 256

    def __init__(self):
        self.buffers: Optional[list[mx.array]] = None  # each (B, 1, capacity, width)
        self.offset = 0

    def update_and_fetch(self, latent: mx.array, rope_key: mx.array) -> tuple[mx.array, mx.array]:
        """Append L tokens ((B, 1, L, .) each); return everything held, (B, 1, offset + L, .)."""
        return tuple(self._append([latent, rope_key]))

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

    def update_and_fetch(self, latent: mx.array, rope_key: mx.array):
        """Returns ((words, scales, biases), rope_key) of everything held."""
        *quantized, rope = self._append([*mx.quantize(latent, self.group_size, self.bits), rope_key])
        return tuple(quantized), rope

    @property
    def meta_state(self) -> str:
        return f"{self.bits},{self.group_size}"

    @meta_state.setter
    def meta_state(self, value) -> None:
        self.bits, self.group_size = map(int, value.split(","))


def make_latent_cache(kv_bits: Optional[int] = None, kv_group_size: int = 64) -> LatentCache:
    return LatentCache() if kv_bits is None else QuantizedLatentCache(kv_bits, kv_group_size)
