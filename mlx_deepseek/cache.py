"""The latent KV cache: per token and layer, only the normalized compressed latent (`kv_lora_rank`
values) and the RoPE'd shared key (`qk_rope_head_dim` values) -- for V2 as for V3.

It follows mlx-lm's cache protocol (`update_and_fetch`, `offset`, `state`, `meta_state`, `trim`,
`is_trimmable`, `nbytes`), with the latent in the role of keys and the RoPE key in the role of
values. Storage grows in steps of `step` tokens and is written in place, never re-concatenated per
token.
"""

from __future__ import annotations

import mlx.core as mx

from .config import ModelArgs


def latent_bytes_per_token(args: ModelArgs, dtype: mx.Dtype) -> int:
    """Bytes one token costs in one layer's cache: the design's memory figure."""
    return (args.kv_lora_rank + args.qk_rope_head_dim) * dtype.size


class LatentCache:
    step = 256

    def __init__(self):
        self.latent = None  # (B, 1, capacity, kv_lora_rank)
        self.rope_key = None  # (B, 1, capacity, qk_rope_head_dim)
        self.offset = 0

    def update_and_fetch(self, latent: mx.array, rope_key: mx.array) -> tuple[mx.array, mx.array]:
        """Append L tokens ((B, 1, L, .) each); return everything held, (B, 1, offset + L, .)."""
        start, length = self.offset, latent.shape[2]
        if self.latent is None or start + length > self.latent.shape[2]:
            self._grow(latent, rope_key, length)
        self.latent[..., start : start + length, :] = latent
        self.rope_key[..., start : start + length, :] = rope_key
        self.offset = start + length
        return self.latent[..., : self.offset, :], self.rope_key[..., : self.offset, :]

    def _grow(self, latent: mx.array, rope_key: mx.array, length: int) -> None:
        extra = (length + self.step - 1) // self.step * self.step
        B = latent.shape[0]
        new_latent = mx.zeros((B, 1, extra, latent.shape[-1]), latent.dtype)
        new_rope = mx.zeros((B, 1, extra, rope_key.shape[-1]), rope_key.dtype)
        if self.latent is None:
            self.latent, self.rope_key = new_latent, new_rope
            return
        held_latent, held_rope = self.latent[..., : self.offset, :], self.rope_key[..., : self.offset, :]
        self.latent = mx.concatenate([held_latent, new_latent], axis=2)
        self.rope_key = mx.concatenate([held_rope, new_rope], axis=2)

    def empty(self) -> bool:
        return self.latent is None

    def size(self) -> int:
        return self.offset

    @property
    def capacity(self) -> int:
        return 0 if self.latent is None else self.latent.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity tokens): `capacity * latent_bytes_per_token` per batch row."""
        return 0 if self.latent is None else self.latent.nbytes + self.rope_key.nbytes

    @property
    def state(self) -> tuple[mx.array, mx.array] | list:
        if self.latent is None:
            return []
        return self.latent[..., : self.offset, :], self.rope_key[..., : self.offset, :]

    @state.setter
    def state(self, value) -> None:
        if not value:
            self.latent, self.rope_key, self.offset = None, None, 0
            return
        self.latent, self.rope_key = value
        self.offset = self.latent.shape[2]

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
