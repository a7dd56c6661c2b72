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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

CACHE_FORMAT = "mlx-deepseek-latent-cache/1"


class CacheFileError(ValueError):
    """A saved cache that cannot be used with this model (names the file and why)."""


def model_fingerprint(model) -> str:
    """Identifies a model's architecture and weights: config, parameter shapes, and a weight sample."""
    from mlx.utils import tree_flatten

    h = hashlib.sha256(json.dumps(vars(model.args), sort_keys=True, default=str).encode())
    for name, p in tree_flatten(model.parameters()):
        h.update(f"{name}{p.shape}{p.dtype}".encode())
    for probe in (model.model.norm.weight, model.layers[0].input_layernorm.weight):
        h.update(np.array(probe.astype(mx.float32)).tobytes())
    return h.hexdigest()[:32]


class PromptCache:
    """A model's latent cache plus the token ids it holds, so prompts can share their prefix."""

    def __init__(self, model):
        self.model = model
        self.cache = model.make_cache()
        self.tokens: list[int] = []

    def reuse(self, prompt: Sequence[int]) -> int:
        """Rewind to the longest common prefix with `prompt` (leaving >= 1 token to run); returns its length."""
        common = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            common += 1
        common = min(common, len(prompt) - 1)
        for c in self.cache:
            c.trim(c.offset - common)
        del self.tokens[common:]
        return common

    def __call__(self, tokens: Sequence[int]) -> mx.array:
        """Run `tokens` through the model on this cache; logits of the last position, (1, vocab)."""
        self.tokens.extend(int(t) for t in tokens)
        return self.model(mx.array([list(tokens)]), cache=self.cache)[:, -1, :]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def reset(self) -> None:
        self.cache = self.model.make_cache()
        self.tokens = []

    def save(self, path: str | os.PathLike, extra: Optional[dict] = None) -> None:
        """Write the held tokens and latents with the model's fingerprint (atomically).

        `extra` (JSON-serializable, e.g. the conversation) travels in the same file.
        """
        arrays = {"tokens": mx.array(np.array(self.tokens, dtype=np.int32))}
        for i, c in enumerate(self.cache):
            if c.offset:
                arrays[f"layer.{i}.latent"], arrays[f"layer.{i}.rope_key"] = c.state
        path = Path(path)
        tmp = path.with_name(path.name + ".partial.safetensors")
        mx.save_safetensors(str(tmp), arrays, metadata={
            "format": CACHE_FORMAT, "model": model_fingerprint(self.model), "extra": json.dumps(extra or {})})
        os.replace(tmp, path)

    def load(self, path: str | os.PathLike) -> dict:
        """Replace this cache by a saved one; returns the `extra` saved with it."""
        path = Path(path)
        try:
            arrays, meta = mx.load(str(path), return_metadata=True)
        except Exception as e:
            raise CacheFileError(f"{path}: not a readable cache file ({e})") from e
        if meta.get("format") != CACHE_FORMAT:
            raise CacheFileError(f"{path}: not an mlx-deepseek cache file (format {meta.get('format')!r})")
        if meta.get("model") != model_fingerprint(self.model):
            raise CacheFileError(f"{path}: saved with a different model; it cannot continue this one")
        tokens = np.array(arrays["tokens"]).tolist()
        cache = self.model.make_cache()
        for i, c in enumerate(cache):
            if tokens:
                try:
                    c.state = (arrays[f"layer.{i}.latent"], arrays[f"layer.{i}.rope_key"])
                except KeyError as e:
                    raise CacheFileError(f"{path}: layer {i} is missing") from e
                if c.offset != len(tokens):
                    raise CacheFileError(f"{path}: layer {i} holds {c.offset} tokens, expected {len(tokens)}")
        self.cache, self.tokens = cache, tokens
        return json.loads(meta.get("extra") or "{}")


def prefill(prompt_cache: PromptCache, tokens: Sequence[int], chunk_size: int = 512) -> mx.array:
    """Run a prompt in chunks of `chunk_size` (bounded memory); logits of its last token."""
    start = 0
    while len(tokens) - start > chunk_size:
        prompt_cache(tokens[start : start + chunk_size])
        mx.eval([c.state for c in prompt_cache.cache])
        start += chunk_size
    return prompt_cache(tokens[start:])


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
        following = sample(prompt_cache.model(token[None], cache=prompt_cache.cache)[:, -1, :])
        mx.async_eval(following)
        value = token.item()
        prompt_cache.tokens.append(value)
        yield value
        token = following


@dataclass
class Stats:
    prompt_tokens: int = 0       # tokens of the prompt ...
    reused_tokens: int = 0       # ... of which were already in the cache
    prompt_tps: float = 0.0      # prefill speed on the rest
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0
    cache_mb: float = 0.0


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
    sampler: Optional[Callable] = None,
    logits_processors: Optional[Sequence[Callable]] = None,
) -> Iterator[Response]:
    """Yield the reply piece by piece. Pass a `PromptCache` to keep (and reuse) the conversation."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if seed is not None:
        mx.random.seed(seed)
    sampler = sampler or make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    if logits_processors is None:
        logits_processors = make_logits_processors(repetition_penalty=repetition_penalty)
    tokens = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not tokens:
        raise ValueError("prompt is empty")
    prompt_cache = prompt_cache or PromptCache(model)
    stats = Stats(prompt_tokens=len(tokens))
    mx.reset_peak_memory()

    start = time.perf_counter()
    stats.reused_tokens = prompt_cache.reuse(tokens)
    logits = prefill(prompt_cache, tokens[stats.reused_tokens :], prefill_step_size)
    mx.eval(logits)
    stats.prompt_tps = (len(tokens) - stats.reused_tokens) / (time.perf_counter() - start)

    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    stop_text = StopText(stop)
    start = time.perf_counter()
    for n, token in enumerate(decode(prompt_cache, logits, sampler, logits_processors), start=1):
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
