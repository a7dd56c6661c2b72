"""Generation on the latent cache: prefill, decode step, stream_generate, prompt-prefix reuse.

Read top to bottom: `PromptCache` remembers which tokens its latent cache holds so a new prompt
prefills only what differs; `prefill` runs a prompt in chunks; `decode` samples token after token,
building step n+1's graph while step n computes (`mx.async_eval`); `stream_generate` ties them to
mlx-lm's samplers, logits processors and streaming detokenizer and adds stop strings and stats.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from .models.cache import make_latent_cache

CACHE_FORMAT = "mlx-deepseek-latent-cache/2"  # /2: with a checksum


class CacheFileError(ValueError):
    """A saved cache that cannot be used with this model (names the file and why)."""


def model_fingerprint(model) -> str:
    """Identifies a model's architecture and weights: config, parameter shapes, and the values of
    its 1-D parameters (norms: small, and different in every fine-tune)."""
    from mlx.utils import tree_flatten

    h = hashlib.sha256(json.dumps(vars(model.args), sort_keys=True, default=str).encode())
    for name, p in tree_flatten(model.parameters()):
        shape = p.shape
        if ".switch_mlp.slots." in name:  # streamed experts (experts_on_disk): named and sized as resident ones
            name, shape = name.replace(".slots.", "."), (model.args.n_routed_experts, *shape[1:])
        h.update(f"{name}{shape}{p.dtype}".encode())
        if p.ndim == 1 and name.endswith("norm.weight"):
            h.update(np.array(p.astype(mx.float32)).tobytes())
    return h.hexdigest()[:32]


class PromptCache:
    """A model's latent cache plus the token ids it holds, so prompts can share their prefix.

    A model loaded with its MTP module also gets `draft_cache`, the MTP layer's own latent cache:
    its entry i belongs to the pair (h_i, t_{i+1}), so it holds at most one entry fewer than
    the main cache. Caches that cannot be trimmed (DeepSeek-V4's) rewind through `snapshots`,
    taken by `checkpoint()` after prompt chunks and decode steps.
    """

    def __init__(self, model, kv_bits: Optional[int] = None, kv_group_size: int = 64):
        self.model = model
        self.cache = model.make_cache(kv_bits, kv_group_size)
        self.draft_cache = model.make_draft_cache() if "mtp" in model else None
        self.tokens: list[int] = []
        # Caches with lost state (DeepSeek-V4's windows) cannot be trimmed: they rewind to a
        # snapshot (references, no copy) and re-run the tokens after it.
        self.snapshots = None if all(c.is_trimmable() for c in self.cache) else Snapshots()
        self.reprefilled = 0  # tokens the last reuse() ran again after restoring a snapshot

    def settle(self, chunk_size: int = 512) -> None:
        """Make `tokens` and every layer's cache agree. A step interrupted part-way (Ctrl-C in the
        middle of a forward pass) leaves some layers ahead of `tokens` and others behind it: keep
        what all of them hold. (Snapshot caches, DeepSeek-V4's, go back to a snapshot and forward.)"""
        n = min([len(self.tokens)] + [c.offset for c in self.cache])
        if self.snapshots is not None:
            if n < len(self.tokens) or not all(c.offset == n and c.consistent() for c in self.cache):
                self._rewind(n, chunk_size)
            return
        for c in self.cache:
            c.trim(c.offset - n)
        del self.tokens[n:]
        if self.draft_cache is not None:
            self.draft_cache.trim(max(0, self.draft_cache.offset - n))

    def reuse(self, prompt: Sequence[int], chunk_size: int = 512) -> int:
        """Rewind to the longest common prefix with `prompt` (leaving >= 1 token to run); returns its length."""
        self.settle()
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)
        self.reprefilled = 0
        if self.snapshots is not None:
            settled_at_end = len(self.tokens) in self.snapshots.settled
            if common < len(self.tokens) or (self.draft_cache is not None and not settled_at_end):
                self._rewind(common, chunk_size)
            return common
        if self.draft_cache is not None:  # the draft needs the pair of the last reused token
            common = min(common, self.draft_cache.offset)
            self.draft_cache.trim(self.draft_cache.offset - common)
        for c in self.cache:
            c.trim(c.offset - common)
        del self.tokens[common:]
        return common

    def _rewind(self, position: int, chunk_size: int) -> None:
        """Restore the latest snapshot at or before `position` (one taken between prompt chunks when
        there is an MTP draft cache, whose pairs must match), then run the held tokens up to it."""
        kept = self.tokens[:position]
        at, pending = self._restore(position, with_draft=self.draft_cache is not None)
        if position > at:
            prefill(self, kept[at:position], chunk_size, pending)
        self.reprefilled = position - at

    def rewind_main(self, tokens: int) -> None:
        """Drop the last `tokens` tokens from the main cache only (a rejected MTP draft)."""
        position = len(self.tokens) - tokens
        if self.snapshots is None:
            for c in self.cache:
                c.trim(tokens)
            del self.tokens[position:]
            return
        kept = self.tokens[:position]
        at, _ = self._restore(position, with_draft=False)
        if position > at:
            self.hidden(kept[at:position])

    def _restore(self, position: int, with_draft: bool) -> tuple[int, Optional[mx.array]]:
        """Bring back the latest (with the draft cache: settled) snapshot at or before `position`;
        (its offset, its last hidden state or None). `tokens` is cut to that offset."""
        at, snap = self.snapshots.before(position, settled=with_draft)
        pending = None
        if snap is None:
            self.cache = self.model.make_cache()
            if with_draft:
                self.draft_cache = self.model.make_draft_cache()
        else:
            main, draft, pending = snap
            for c, s in zip(self.cache, main):
                c.restore(s)
            if with_draft and draft is not None:
                self.draft_cache.restore(draft)
        del self.tokens[at:]
        return at, pending

    def checkpoint(self, pending: Optional[mx.array], settled: bool = False) -> None:
        """Record a snapshot (untrimmable caches only). `settled`: between prompt chunks, where the
        draft cache holds exactly the pairs of the main tokens and `pending` is the last hidden state."""
        if self.snapshots is not None:
            draft = self.draft_cache.snapshot() if settled and self.draft_cache is not None else None
            self.snapshots.record(self.cache[0].offset,
                                  ([c.snapshot(settled) for c in self.cache], draft, pending if settled else None),
                                  settled)

    def __call__(self, tokens: Sequence[int]) -> mx.array:
        """Run `tokens` through the model on this cache; logits of the last position, (1, vocab)."""
        return self.model.logits(self.hidden(tokens)[:, -1, :])

    def hidden(self, tokens: Sequence[int] | mx.array) -> mx.array:
        """Run `tokens` through the main model on this cache; final hidden states (1, L, D).
        A lazy (1,) array of one token (decoding) is fed as it is and recorded by `decode`."""
        if isinstance(tokens, mx.array):
            return self.model.hidden(tokens[None], cache=self.cache)
        self.tokens.extend(int(t) for t in tokens)
        return self.model.hidden(mx.array([list(tokens)]), cache=self.cache)

    def draft(self, hidden: mx.array, next_tokens: Sequence[int]) -> mx.array:
        """Feed pairs (h_i, t_{i+1}) to the MTP module; its logits for the last one, (1, vocab)."""
        return self.model.draft_logits(hidden, mx.array([list(next_tokens)]), self.draft_cache)[:, -1, :]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def save(self, path: str | os.PathLike, extra: Optional[dict] = None) -> None:
        """Write the held tokens and latents with the model's fingerprint and a checksum (atomically:
        an existing file is replaced only once the new one is complete on disk).

        `extra` (JSON-serializable, e.g. the conversation) travels in the same file.
        """
        self.settle()
        arrays = {"tokens": mx.array(np.array(self.tokens, dtype=np.int32))}
        for name, c in self._named_caches():
            for j, a in enumerate(c.state):
                arrays[f"{name}.{j}"] = a
        meta = {"format": CACHE_FORMAT, "model": model_fingerprint(self.model),
                "caches": json.dumps({name: c.meta_state for name, c in self._named_caches()}),
                "extra": json.dumps(extra or {})}
        meta["checksum"] = cache_checksum(arrays, meta)
        path = Path(path)
        tmp = path.with_name(path.name + ".partial.safetensors")
        try:
            mx.save_safetensors(str(tmp), arrays, metadata=meta)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _named_caches(self):
        named = [(f"layer.{i}", c) for i, c in enumerate(self.cache)]
        return named + ([("draft", self.draft_cache)] if self.draft_cache is not None else [])

    def load(self, path: str | os.PathLike) -> dict:
        """Replace this cache by a saved one (plain or quantized, as saved); returns its `extra`.
        A file that is not exactly what was saved for this model raises CacheFileError and leaves
        this cache as it was."""
        path = Path(path)
        arrays, meta = read_cache_file(path)
        if meta.get("model") != model_fingerprint(self.model):
            raise CacheFileError(f"{path}: saved with a different model; it cannot continue this one")
        try:
            kinds, extra = json.loads(meta["caches"]), json.loads(meta["extra"])
        except (KeyError, ValueError, RecursionError) as e:
            raise CacheFileError(f"{path}: corrupt metadata ({e})") from None
        tokens = arrays.get("tokens")
        if tokens is None or tokens.ndim != 1 or tokens.dtype != mx.int32 or not isinstance(kinds, dict) \
                or not isinstance(extra, dict):
            raise CacheFileError(f"{path}: corrupt contents (tokens, caches or extra)")
        tokens = np.array(tokens).tolist()
        restored = {name: self._restored(path, name, kind, arrays, len(tokens)) for name, kind in kinds.items()}
        cache = [restored.get(f"layer.{i}") for i in range(len(self.cache))]
        for i, c in enumerate(cache):
            if c is None or c.offset != len(tokens):
                raise CacheFileError(f"{path}: layer {i} is missing or does not hold the {len(tokens)} saved tokens")
        self.cache, self.tokens = cache, tokens
        if self.draft_cache is not None:
            self.draft_cache = restored.get("draft", self.model.make_draft_cache())
        if self.snapshots is not None:  # the loaded state is where the next turn starts
            self.snapshots = Snapshots()
            self.checkpoint(None, settled=True)
        return extra

    def _restored(self, path: Path, name: str, kind, arrays: dict, n: int):
        """One saved cache, its arrays checked against the model's latent widths."""
        if self.snapshots is not None:
            return self._restored_v4(path, name, kind, arrays)
        args = self.model.args
        try:
            bits, group = map(int, kind.split(",")) if kind else (None, 64)
            c = make_latent_cache(bits, group)
        except (AttributeError, ValueError, TypeError):
            raise CacheFileError(f"{path}: {name} has an unknown cache kind {kind!r}") from None
        parts = [arrays[f"{name}.{j}"] for j in range(len(arrays)) if f"{name}.{j}" in arrays]
        R, rope = args.kv_lora_rank, args.qk_rope_head_dim
        widths = [R, rope] if bits is None else [R * bits // 32, R // group, R // group, rope]
        widths += [args.index_head_dim] if args.sparse else []  # V3.2: the indexer keys
        length = parts[0].shape[2] if parts and parts[0].ndim == 4 else -1
        if parts and not (len(parts) == len(widths) and 0 < length <= n and all(
                p.ndim == 4 and tuple(p.shape[:3]) == (1, 1, length) and p.shape[3] == w for p, w in zip(parts, widths))):
            raise CacheFileError(f"{path}: {name} holds arrays of shapes {[p.shape for p in parts]}, "
                                 f"not this model's latent cache")
        c.state = parts
        return c

    def _restored_v4(self, path: Path, name: str, kind, arrays: dict):
        """One saved DeepSeek-V4 layer (or MTP block) cache: its parts named and shaped as this model's."""
        parts = [arrays[f"{name}.{j}"] for j in range(len(arrays)) if f"{name}.{j}" in arrays]
        n = self.model.args.num_hidden_layers
        if name == "draft":
            c = self.model.make_draft_cache()
        elif name.startswith("layer.") and name[6:].isdigit() and int(name[6:]) < n:
            c = self.model.make_cache()[int(name[6:])]
        else:
            raise CacheFileError(f"{path}: {name} is not a cache of this model")
        try:
            c.load_state(kind, parts)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CacheFileError(f"{path}: {name} does not fit this model ({e})") from None
        return c


CACHE_ARRAY = re.compile(r"^(tokens|layer\.\d+\.\d+|draft\.\d+)$")


def cache_checksum(arrays: dict[str, mx.array], meta: dict[str, str]) -> str:
    """sha256 of every array (name, dtype, shape, bytes) and the metadata that describes them."""
    h = hashlib.sha256()
    for key in ("format", "model", "caches", "extra"):
        h.update(f"{key}={meta.get(key)}\n".encode())
    for name in sorted(arrays):
        a = mx.contiguous(arrays[name])
        h.update(f"{name}:{a.dtype}:{a.shape}\n".encode())
        h.update(memoryview(np.array(a.view(mx.uint8) if a.size else mx.zeros((0,), mx.uint8))))
    return h.hexdigest()


def read_cache_file(path: Path) -> tuple[dict, dict]:
    """A cache file's arrays and metadata, refused (CacheFileError) unless exactly as saved."""
    from .loading import safetensors_header
    from .layout import CheckpointError

    if not path.is_file():
        raise CacheFileError(f"{path}: no such file")
    try:
        safetensors_header(path)  # offsets and sizes checked before MLX reads anything
        arrays, meta = mx.load(str(path), return_metadata=True)
    except (CheckpointError, RuntimeError, ValueError) as e:
        raise CacheFileError(f"{path}: not a readable cache file ({e})") from None
    if meta.get("format") != CACHE_FORMAT:
        old = meta.get("format") == "mlx-deepseek-latent-cache/1"
        raise CacheFileError(f"{path}: " + ("saved by an earlier version without a checksum; it cannot be verified"
                                            if old else f"not an mlx-deepseek cache file (format {meta.get('format')!r})"))
    if not all(CACHE_ARRAY.match(name) for name in arrays):
        raise CacheFileError(f"{path}: corrupt (unexpected arrays {sorted(arrays)[:3]})")
    if meta.get("checksum") != cache_checksum(arrays, meta):
        raise CacheFileError(f"{path}: corrupt (its checksum does not match its contents); nothing was loaded")
    return arrays, meta


def prefill(prompt_cache: PromptCache, tokens: Sequence[int], chunk_size: int = 512,
            pending: Optional[mx.array] = None):
    """Run a prompt in chunks of `chunk_size` (bounded memory).

    Returns the logits of its last token and that token's hidden state (1, 1, D). With an MTP
    module, every pair (h_i, t_{i+1}) inside the prompt also goes through the draft cache
    (`pending`: the hidden state of the token before the prompt, when the draft cache needs it).
    """
    for start in range(0, len(tokens), chunk_size):
        chunk = tokens[start : start + chunk_size]
        if prompt_cache.draft_cache is None and len(chunk) > 1:
            # Without a draft only the caches are needed from the prompt, and the last token's
            # logits: evaluating the caches alone skips the last layer's FFN for the other tokens.
            final = start + chunk_size >= len(tokens)
            prompt_cache.hidden(chunk[:-1] if final else chunk)
            mx.eval([c.state for c in prompt_cache.cache])
            if not final:
                prompt_cache.checkpoint(None, settled=True)
                continue
            chunk = chunk[-1:]
        h = prompt_cache.hidden(chunk)
        if prompt_cache.draft_cache is not None:
            pairs = h if pending is None else mx.concatenate([pending, h], axis=1)
            following = chunk[1:] if pending is None else chunk
            if following:
                prompt_cache.draft(pairs[:, : len(following)], following)
        pending = h[:, -1:, :]
        mx.eval(pending, [c.state for c in prompt_cache.cache])
        prompt_cache.checkpoint(pending, settled=True)
    return prompt_cache.model.logits(pending[:, -1, :]), pending


def decode(
    prompt_cache: PromptCache,
    logits: mx.array,
    sampler: Callable[[mx.array], mx.array],
    logits_processors: Sequence[Callable] = (),
) -> Iterator[int]:
    """Sample a token, feed it, repeat; the next step's graph is built while this one computes."""
    history = mx.array(prompt_cache.tokens)

    def sample(logits):
        nonlocal history
        for process in logits_processors:
            logits = process(history, logits)
        token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        history = mx.concatenate([history, token])
        return token

    token = sample(logits)
    mx.async_eval(token)
    while True:
        # Feed the token while it is still lazy: this step's graph is built before the last one ends.
        following = sample(prompt_cache.model.logits(prompt_cache.hidden(token)[:, -1, :]))
        prompt_cache.checkpoint(None)
        mx.async_eval(following)
        value = token.item()
        prompt_cache.tokens.append(value)
        yield value
        token = following


class DraftPolicy:
    """How speculative decoding picks and checks tokens. temp == 0: greedy, a draft is accepted when
    it is the target's argmax. temp > 0: speculative sampling (Leviathan et al., Chen et al. 2023) on
    the temperature / top-k / top-p / min-p filtered distributions: accept d with probability
    min(1, p(d) / q(d)), otherwise draw from max(p - q, 0) renormalized, so the output is
    distributed exactly as sampling the main model alone."""

    def __init__(self, temp: float = 0.0, top_p: float = 0.0, min_p: float = 0.0, top_k: int = 0):
        self.temp, self.top_p, self.min_p, self.top_k = temp, top_p, min_p, top_k

    def probs(self, logits: mx.array) -> mx.array:
        p = mx.softmax(logits.astype(mx.float32) / self.temp, axis=-1)
        if self.top_k:
            kth = mx.sort(p, axis=-1)[..., -self.top_k][..., None]
            p = mx.where(p >= kth, p, 0.0)
        if 0 < self.top_p < 1:
            ordered = mx.sort(p, axis=-1)
            mass_above = mx.cumsum(ordered[..., ::-1], axis=-1)[..., ::-1] - ordered  # mass of larger tokens
            cutoff = mx.min(mx.where(mass_above < self.top_p, ordered, mx.inf), axis=-1, keepdims=True)
            p = mx.where(p >= cutoff, p, 0.0)
        if self.min_p:
            p = mx.where(p >= self.min_p * p.max(axis=-1, keepdims=True), p, 0.0)
        return p / p.sum(axis=-1, keepdims=True)

    def sample(self, logits: mx.array) -> int:
        if self.temp == 0:
            return int(mx.argmax(logits, axis=-1).item())
        return int(mx.random.categorical(mx.log(self.probs(logits))).item())

    def verify(self, target: mx.array, draft: mx.array, token: int) -> Optional[int]:
        """None if `token` (drawn from `draft`) is accepted, else the token to emit instead."""
        if self.temp == 0:
            best = int(mx.argmax(target, axis=-1).item())
            return None if best == token else best
        p, q = self.probs(target)[0], self.probs(draft)[0]
        if mx.random.uniform().item() * q[token].item() < p[token].item():
            return None
        residual = mx.maximum(p - q, 0.0)
        return int(mx.random.categorical(mx.log(residual / residual.sum())).item())


def decode_mtp(prompt_cache: PromptCache, logits: mx.array, pending: mx.array, policy: DraftPolicy,
               stats: "Stats") -> Iterator[int]:
    """Self-speculative decoding: the MTP module drafts the token after next, and one main forward
    pass over [token, draft] both verifies the draft and computes the token after it. Yields one or
    two tokens per main step; on rejection the draft's cache entry is rewound."""
    pc = prompt_cache
    token = policy.sample(logits)
    draft_logits = pc.draft(pending, [token])
    while True:
        draft = policy.sample(draft_logits)
        yield token
        pc.checkpoint(None)  # before the step: a rejected draft rewinds to here and feeds `token` again
        h = pc.hidden([token, draft])
        target = pc.model.logits(h)
        instead = policy.verify(target[:, 0], draft_logits, draft)
        stats.main_steps += 1
        stats.drafted += 1
        if instead is None:
            stats.accepted += 1
            yield draft
            token = policy.sample(target[:, 1])
            draft_logits = pc.draft(h, [draft, token])
        else:
            pc.rewind_main(1)
            token = instead
            draft_logits = pc.draft(h[:, :1], [token])


class Snapshots:
    """Snapshots of a cache that cannot be trimmed (DeepSeek-V4's), by the number of tokens it held:
    after every prompt chunk ("settled": with the draft cache and the last hidden state, kept), every
    `every` decoded tokens (kept), and the last `recent` decode steps (a stop string or a rejected
    draft rewinds a few tokens)."""

    every, recent = 256, 4

    def __init__(self):
        self.kept: dict[int, tuple] = {}
        self.settled: set[int] = set()
        self.latest: list[int] = []

    def record(self, at: int, snap: tuple, settled: bool) -> None:
        if at in self.settled and not settled:
            return
        self.kept[at] = snap
        if settled:
            self.settled.add(at)
        elif at % self.every:
            self.latest.append(at)
            if len(self.latest) > self.recent:
                old = self.latest.pop(0)
                if old not in self.settled:
                    self.kept.pop(old, None)

    def before(self, position: int, settled: bool = False):
        """(offset, snapshot) of the latest snapshot at or before `position` ((0, None) if none),
        only settled ones if asked; later ones are dropped: the cache is about to leave that future."""
        usable = self.settled if settled else self.kept
        at = max((k for k in usable if k <= position), default=0)
        for k in [k for k in self.kept if k > at]:
            del self.kept[k]
        self.settled = {k for k in self.settled if k <= at}
        self.latest = [k for k in self.latest if k <= at]
        return at, self.kept.get(at)


@dataclass
class Stats:
    prompt_tokens: int = 0       # tokens of the prompt ...
    reused_tokens: int = 0       # ... of which were already in the cache
    reprefilled_tokens: int = 0  # reused tokens run again after a snapshot (DeepSeek-V4's rewind)
    prompt_tps: float = 0.0      # prefill speed on the rest
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    cache_mb: float = 0.0
    drafted: int = 0             # MTP drafts checked ...
    accepted: int = 0            # ... and accepted
    main_steps: int = 0          # main-model forward passes while decoding with MTP

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Response:
    text: str                    # the new piece of text (may be empty while a character is incomplete)
    token: int
    stats: Stats
    finish_reason: Optional[str] = None  # "stop" (EOS or stop string), "length", or None while going


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    top_k: int = 0,
    repetition_penalty: Optional[float] = None,
    seed: Optional[int] = None,
    stop: Sequence[str] = (),
    prefill_step_size: int = 512,
    prompt_cache: Optional[PromptCache] = None,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    sampler: Optional[Callable] = None,
    logits_processors: Optional[Sequence[Callable]] = None,
    mtp: bool = False,
) -> Iterator[Response]:
    """Yield the reply piece by piece. Pass a `PromptCache` to keep (and reuse) the conversation;
    without one, `kv_bits` (8 or 4) makes a fresh cache that stores the latents quantized.

    `mtp=True` decodes speculatively with the model's MTP module (load it with `mtp=True`): the same
    tokens greedily, the same distribution when sampling (temperature, top-k, top-p, min-p).
    """
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if mtp and "mtp" not in model:
        raise ValueError("this model was loaded without its MTP module: load(..., mtp=True)")
    if mtp and (sampler is not None or logits_processors is not None or repetition_penalty):
        raise ValueError("MTP decoding supports temp, top_p, min_p and top_k, not custom samplers or penalties")
    if seed is not None:
        mx.random.seed(seed)
    sampler = sampler or make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    if logits_processors is None:
        logits_processors = make_logits_processors(repetition_penalty=repetition_penalty)
    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not tokens:
        raise ValueError("prompt is empty")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    prompt_cache = prompt_cache or PromptCache(model, kv_bits, kv_group_size)
    stats = Stats(prompt_tokens=len(tokens))
    mx.reset_peak_memory()

    start = time.perf_counter()
    stats.reused_tokens = prompt_cache.reuse(tokens, prefill_step_size)
    stats.reprefilled_tokens = prompt_cache.reprefilled
    logits, pending = prefill(prompt_cache, tokens[stats.reused_tokens :], prefill_step_size)
    mx.eval(logits)
    stats.prompt_tps = (len(tokens) - stats.reused_tokens) / (time.perf_counter() - start)

    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    stop_text = StopText(stop)
    start = time.perf_counter()
    if mtp:
        steps = decode_mtp(prompt_cache, logits, pending, DraftPolicy(temp, top_p, min_p, top_k), stats)
    else:
        steps = decode(prompt_cache, logits, sampler, logits_processors)
    for n, token in enumerate(steps, start=1):
        stats.generation_tokens = n
        stats.generation_tps = n / (time.perf_counter() - start)
        stats.peak_memory_gb = mx.get_peak_memory() / 1e9
        stats.cache_mb = prompt_cache.nbytes / 1e6
        if token in tokenizer.eos_token_ids:
            yield Response(stop_text.flush(), token, stats, "stop")
            return
        detokenizer.add_token(token)
        text, stopped = stop_text.add(detokenizer.last_segment)
        if stopped:
            yield Response(text, token, stats, "stop")
            return
        if n == max_tokens:
            detokenizer.finalize()
            yield Response(text + stop_text.add(detokenizer.last_segment)[0] + stop_text.flush(), token, stats, "length")
            return
        yield Response(text, token, stats)


def sampling_defaults(folder: Path) -> dict:
    """The model's recommended sampling (R1: temperature 0.6, top-p 0.95) from generation_config.json."""
    from .layout import CheckpointError

    folder = Path(folder)
    file, config = folder / "generation_config.json", {}
    if file.is_file():
        try:
            config = json.loads(file.read_bytes())
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{file}: a JSON {type(config).__name__}, expected an object")
    if config.get("do_sample") is False:
        return {"temp": 0.0, "top_p": 0.0}
    out = {"temp": config.get("temperature", 0.6), "top_p": config.get("top_p", 0.95)}
    for key, value in out.items():
        if value is None:
            out[key] = {"temp": 0.6, "top_p": 0.95}[key]
        elif type(value) not in (int, float) or not 0 <= value < float("inf") or (key == "top_p" and value > 1):
            raise CheckpointError(f"{file}: {'temperature' if key == 'temp' else key}={value!r} is not valid: "
                                  f"expected a number{' between 0 and 1' if key == 'top_p' else ' >= 0'}")
        out[key] = float(out[key])
    return out


def generate(model, tokenizer, prompt, max_tokens: int = 256, **kwargs) -> str:
    """The whole reply as one string (see `stream_generate` for the options)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))


class StopText:
    """Releases streamed text, holding back any tail that may be the start of a stop string."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def add(self, piece: str) -> tuple[str, bool]:
        self.pending += piece
        for s in self.stops:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
