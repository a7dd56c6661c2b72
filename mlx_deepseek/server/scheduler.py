"""One generation thread that owns every MLX call: a queue, continuous batching, cancellation.

A request is tokenized by the HTTP side and handed over as a `Request`. The thread admits up to
`max_concurrency` of them; the rest wait in the queue. A new request first takes the longest
cached prefix of its prompt from the `PromptStore`, then prefills the rest on its own cache, one
chunk per loop turn so the running replies keep streaming. Its first token sampled, it joins the
batch: every loop turn decodes all running sequences in one forward pass (`BatchLatentCache`: each
row attends on its own latent history). A sequence leaves the batch between steps when it ends,
is cancelled (client gone) or reaches its limit; its cache goes back to the store.

Events go back through `Request.emit` (called on this thread; the HTTP side makes it thread-safe):
`("token", Piece)` per generated token and one `("done", Finish)` at the end, or `("error", str)`.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx

from ..generate import DraftPolicy, PromptCache, Stats, StopText, decode_mtp, prefill
from ..models.cache import BatchLatentCache
from .prompt_cache import PromptStore


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    top_k: int = 0
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    logprobs: Optional[int] = None  # None: none; k: the token's and the k most likely
    # A warm-up: prefill `prompt` (a finished reply's conversation as the template will render it
    # when the client sends it back) into the prompt cache, and generate nothing.
    warm: bool = False
    logits_processors: list = field(default_factory=list)  # besides repetition_penalty's
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Piece:
    text: str
    token: int
    logprob: Optional[float] = None
    top: Optional[list[tuple[int, float]]] = None


@dataclass
class Finish:
    reason: str                 # "stop", "length", "cancelled" or "warm" (a warm-up's)
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prompt_seconds: float       # queue wait excluded: from admission to the first token
    decode_seconds: float


def seeded_sampler(req: Request):
    """mlx-lm's filters in its order, then a draw from this request's own random key: the same seed
    gives the same reply whether the request is served alone or beside others."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    key = mx.random.key(req.seed)

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        if 0 < req.top_p < 1.0:
            logprobs = apply_top_p(logprobs, req.top_p)
        if req.min_p:
            logprobs = apply_min_p(logprobs, req.min_p, 1)
        if req.top_k > 0:
            logprobs = apply_top_k(logprobs, req.top_k)
        key, sub = mx.random.split(key)
        return mx.random.categorical(logprobs * (1.0 / req.temp), key=sub)

    return sample


class Sequence:
    """A request being served: its cache while prefilling, then its row in the batch."""

    def __init__(self, req: Request, caches, reused: int, tokenizer):
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        self.req = req
        self.caches = caches                  # per-layer caches until it joins the batch
        self.reused = reused
        self.pending = req.prompt[reused:]    # prompt tokens still to prefill
        self.held = list(req.prompt[:reused])  # tokens its cache holds
        self.generated: list[int] = []
        if req.seed is not None and req.temp > 0:
            self.sampler = seeded_sampler(req)
        else:
            self.sampler = make_sampler(temp=req.temp, top_p=req.top_p, min_p=req.min_p, top_k=req.top_k)
        self.processors = make_logits_processors(repetition_penalty=req.repetition_penalty) + req.logits_processors
        self.detokenizer = tokenizer.detokenizer
        self.stop_text = StopText(req.stop)
        self.started = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.last_logprobs: Optional[mx.array] = None


class Scheduler:
    def __init__(self, model, tokenizer, store: PromptStore, max_concurrency: int = 8,
                 prefill_step_size: int = 512, kv_bits: Optional[int] = None, kv_group_size: int = 64,
                 mtp: bool = False):
        self.model, self.tokenizer, self.store = model, tokenizer, store
        # One sequence at a time where steps cannot be batched: MTP's speculative steps, and
        # DeepSeek-V4 (its cache is windows and compressed entries, not a latent history that rows
        # can be padded in). Requests then take turns on one PromptCache, which reuses the previous
        # request's prefix (V4: from its snapshots) and keeps the draft cache.
        self.mtp = mtp
        self.single = PromptCache(model, kv_bits, kv_group_size) if mtp or not batchable(model) else None
        self.max_concurrency = 1 if self.single is not None else max_concurrency
        self.prefill_step_size = prefill_step_size
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.queue: "queue.Queue[Request]" = queue.Queue()
        self.prefilling: list[Sequence] = []
        self.running: list[Sequence] = []     # in batch row order
        self.batch: Optional[list[BatchLatentCache]] = None
        # The next step, already queued: the tokens it draws (lazy, one per running row) from a
        # forward pass fed with each row's last token, built while the step before it computed.
        self.ahead: Optional[mx.array] = None
        self.joining: list[Sequence] = []     # prefilled, waiting for the queued step to be read
        self.eos = set(tokenizer.eos_token_ids)
        self.steps = 0                        # batched decode steps taken
        self.max_batch = 0                    # the most rows decoded in one step
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mlx-generation", daemon=True)

    # -- the HTTP side ----------------------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)

    def submit(self, req: Request) -> None:
        self.queue.put(req)

    @property
    def load(self) -> dict:
        return {"running": len(self.running), "prefilling": len(self.prefilling), "queued": self.queue.qsize(),
                "decode_steps": self.steps, "max_batch": self.max_batch}

    # -- the generation thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception as e:  # never die: fail the requests in flight, keep serving
                for s in self.prefilling + self.running + self.joining:
                    s.req.emit(("error", f"generation failed: {e}"))
                self.prefilling, self.running, self.joining, self.batch, self.ahead = [], [], [], None, None

    def _turn(self) -> None:
        if self.single is not None:
            return self._turn_single()
        self._admit(block=not (self.prefilling or self.running or self.joining))
        for s in [s for s in self.prefilling if s.req.cancelled.is_set()]:
            self.prefilling.remove(s)
            self._finish_alone(s, "cancelled")
        if self.prefilling and self._prefill_chunk(self.prefilling[0]):
            self.prefilling.pop(0)
        if self.running or self.joining:
            self._decode_step()

    def _admit(self, block: bool) -> None:
        while len(self.prefilling) + len(self.running) + len(self.joining) < self.max_concurrency:
            try:
                req = self.queue.get(timeout=0.05) if block else self.queue.get_nowait()
            except queue.Empty:
                return
            block = False
            if req.cancelled.is_set():
                continue
            if req.warm and self.store.holds(req.prompt):
                continue  # already cached as it will come back
            caches, reused = self.store.take(req.prompt)
            if caches is None:
                caches = self.model.make_cache(self.kv_bits, self.kv_group_size)
            s = Sequence(req, caches, reused, self.tokenizer)
            if req.warm:  # at once, so that every request submitted after it finds it stored
                while not self._prefill_chunk(s):
                    pass
                continue
            self.prefilling.append(s)

    def _prefill_chunk(self, s: Sequence) -> bool:
        """Prefill the next chunk of `s`; True when its prompt is done (it then has its first token,
        has joined or ended; a warm-up has gone to the store)."""
        chunk, s.pending = s.pending[: self.prefill_step_size], s.pending[self.prefill_step_size:]
        # Only the caches are needed from the prompt, and the last token's logits: evaluating the
        # caches alone skips the last layer's FFN for the other tokens.
        final = not s.pending and not s.req.warm
        body = chunk[:-1] if final else chunk
        if body:
            self.model.hidden(mx.array([body]), cache=s.caches)
            mx.eval([c.state for c in s.caches])
        s.held += chunk
        if s.pending:
            return False
        if s.req.warm:
            self._finish_alone(s, "warm")
            return True
        logits = self.model.logits(self.model.hidden(mx.array([chunk[-1:]]), cache=s.caches)[:, -1, :])
        token = self._sample(s, logits)
        s.first_token_at = time.perf_counter()
        reason = self._emit(s, token)
        if reason:
            self._finish_alone(s, reason)
        else:
            self.joining.append(s)  # joins the batch when no step is queued ahead
        return True

    def _join(self) -> None:
        for s in self.joining:
            rows = [BatchLatentCache.from_caches([c]) for c in s.caches]
            s.caches = None
            if self.batch is None:
                self.batch = rows
            else:
                for b, r in zip(self.batch, rows):
                    b.extend(r)
            self.running.append(s)
        self.joining = []

    def _forward(self, last: mx.array) -> mx.array:
        """Feed each running row its last token ((B, 1), lazy or not); the tokens drawn, lazy (B,)."""
        logits = self.model(last, cache=self.batch)[:, -1, :]
        self.steps += 1
        self.max_batch = max(self.max_batch, len(self.running))
        return self._draw(self.running, logits)

    def _decode_step(self) -> None:
        """Read one step's tokens and emit them. Where no row needs its history at sampling time
        (repetition penalty, a forced tool call, logprobs) and none waits to join, the next step is
        queued first, fed with this step's tokens while they are still lazy: the forward pass
        computes while this thread streams the tokens (as mlx-lm's generation loop does). A row
        that ends then holds one token more (its last), which its stored cache keeps."""
        if self.ahead is None:
            self._join()
            drawn = self._forward(mx.array([[s.generated[-1]] for s in self.running]))
            for s in self.running:
                s.held.append(s.generated[-1])
        else:
            drawn, self.ahead = self.ahead, None
        queued = not self.joining and all(not s.processors and s.req.logprobs is None for s in self.running)
        if queued:
            self.ahead = self._forward(drawn[:, None])
            mx.async_eval(self.ahead)
        tokens = drawn.tolist()
        for s, token in zip(self.running, tokens):
            s.generated.append(token)
            if queued:
                s.held.append(token)
        keep, done = [], []
        for row, s in enumerate(self.running):
            if s.req.cancelled.is_set():
                done.append((row, s, "cancelled"))
                continue
            reason = self._emit(s, tokens[row])
            if reason:
                done.append((row, s, reason))
            else:
                keep.append(row)
        for row, s, reason in done:
            caches = [b.extract(row) for b in self.batch]
            self._finish(s, reason, caches)
        if done:
            self.running = [self.running[r] for r in keep]
            if keep:
                for b in self.batch:
                    b.keep(keep)
                if self.ahead is not None:
                    self.ahead = self.ahead[mx.array(keep)]
            else:
                self.batch = self.ahead = None

    def _turn_single(self) -> None:
        """Serve one request to its end on `self.single` (the next waits in the queue)."""
        try:
            req = self.queue.get(timeout=0.05)
        except queue.Empty:
            return
        if req.cancelled.is_set():
            return
        pc = self.single
        if req.warm and pc.tokens[: len(req.prompt)] == req.prompt:
            return  # already cached as it will come back
        reused = pc.reuse(req.prompt)
        if req.warm:
            prefill(pc, req.prompt[reused:], self.prefill_step_size)
            return
        s = Sequence(req, None, reused, self.tokenizer)  # its clock starts before the prefill
        logits, pending = prefill(pc, req.prompt[reused:], self.prefill_step_size)
        reason = self._serve_mtp(s, pc, logits, pending) if self.mtp else self._serve_plain(s, pc, logits)
        s.held = list(pc.tokens)
        self._finish(s, reason, None)

    def _serve_plain(self, s: Sequence, pc: PromptCache, logits: mx.array) -> str:
        while True:
            token = self._sample(s, logits)
            s.first_token_at = s.first_token_at or time.perf_counter()
            reason = "cancelled" if s.req.cancelled.is_set() else self._emit(s, token)
            if reason:
                return reason
            logits = pc([token])
            pc.checkpoint(None)
            self.steps += 1

    def _serve_mtp(self, s: Sequence, pc: PromptCache, logits: mx.array, pending: mx.array) -> Optional[str]:
        req = s.req
        if req.seed is not None:
            mx.random.seed(req.seed)
        stats = Stats()
        steps = decode_mtp(pc, logits, pending, DraftPolicy(req.temp, req.top_p, req.min_p, req.top_k), stats)
        reason = None
        for token in steps:
            s.generated.append(token)
            s.first_token_at = s.first_token_at or time.perf_counter()
            reason = "cancelled" if req.cancelled.is_set() else self._emit(s, token)
            if reason:
                break
        steps.close()
        self.steps += stats.main_steps
        return reason

    def _sample(self, s: Sequence, logits: mx.array) -> int:
        token = self._draw([s], logits).item()
        s.generated.append(token)
        return token

    def _draw(self, seqs: list[Sequence], logits: mx.array) -> mx.array:
        """One token per row of `logits` (B, vocab), each by its sequence's own sampler: (B,), lazy."""
        picks = []
        for row, s in enumerate(seqs):
            x = logits[row : row + 1]
            if s.processors:
                history = mx.array(s.req.prompt + s.generated)
                for process in s.processors:
                    x = process(history, x)
            logprobs = x - mx.logsumexp(x, axis=-1, keepdims=True)
            picks.append(s.sampler(logprobs).reshape(1))
            s.last_logprobs = logprobs if s.req.logprobs is not None else None
        return mx.concatenate(picks)

    def _emit(self, s: Sequence, token: int) -> Optional[str]:
        """Send the token's text; the finish reason when the sequence ends here, else None."""
        piece = Piece("", token)
        if s.last_logprobs is not None:
            lp = s.last_logprobs[0]
            piece.logprob = float(lp[token].item())
            if s.req.logprobs:
                top = mx.argsort(-lp)[: s.req.logprobs].tolist()
                piece.top = [(t, float(lp[t].item())) for t in top]
        if token in self.eos:
            piece.text = s.stop_text.flush()
            s.req.emit(("token", piece))
            return "stop"
        s.detokenizer.add_token(token)
        text, stopped = s.stop_text.add(s.detokenizer.last_segment)
        if stopped:
            piece.text = text
            s.req.emit(("token", piece))
            return "stop"
        if len(s.generated) >= s.req.max_tokens:
            s.detokenizer.finalize()
            piece.text = text + s.stop_text.add(s.detokenizer.last_segment)[0] + s.stop_text.flush()
            s.req.emit(("token", piece))
            return "length"
        piece.text = text
        s.req.emit(("token", piece))
        return None

    def _finish_alone(self, s: Sequence, reason: str) -> None:
        self._finish(s, reason, s.caches)

    def _finish(self, s: Sequence, reason: str, caches) -> None:
        if caches is not None and s.held:
            held = len(s.held)
            if all(c.offset == held for c in caches):
                mx.eval([c.state for c in caches])
                self.store.put(s.held, caches)
        now = time.perf_counter()
        first = s.first_token_at or now
        s.req.emit(("done", Finish(reason, len(s.req.prompt), s.reused, len(s.generated), first - s.started, now - first)))


def batchable(model) -> bool:
    """Whether decode steps of several sequences can share one forward (the MLA latent cache)."""
    return all(c.is_trimmable() for c in model.make_cache())


def prompt_cache_factory(model, kv_bits=None, kv_group_size=64):
    """PromptCache objects to read and write the store's files with."""
    return lambda: PromptCache(model, kv_bits, kv_group_size)
