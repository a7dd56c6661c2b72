"""Pipeline parallelism across Macs with MLX's own distributed engine (`mx.distributed`, launched
by `mlx.launch`: ring over TCP, or JACCL over Thunderbolt RDMA).

Each rank holds a contiguous slice of layers (split by their bytes on disk, or `layers_split`),
loads only those weights and keeps the latent cache of only those layers. Rank 0 also holds the
embedding, the final norm and the head, and owns tokenization, sampling and the terminal. A
forward pass walks the ring: rank 0 embeds and runs its layers, sends the activations (B, L, D) to
rank 1, ..., and the last rank sends them back to rank 0. Before the activations, a 4-value header
says what comes: a forward of L tokens (through the caches or without them), a rewind, a fresh
cache, or stop. The other ranks hold one set of caches: one conversation at a time, the one of the
latest `make_cache()`.

DeepSeek-V4 (`deepseek_v4`): what crosses the ring are the hc_mult = 4 hyper-connection streams,
(B, L, 4, D) -- 4 x 7,168 values per token for V4-Pro, 57 KB in bf16 -- and the token ids (the
hash-routed layers route by them). Its caches cannot be trimmed: rank 0's snapshots (prompt
chunks, decode steps) are mirrored on every rank by a SNAPSHOT header with the same offsets and
the same keeping rule, and a rewind is a RESTORE to one of them.

    model, tokenizer = pipeline(path)          # on every rank
    if tokenizer is None:                      # ranks > 0
        model.serve()                          # until rank 0 stops
    else:
        ... stream_generate(model, tokenizer, ...) ...
        model.stop()
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .models import args_from_config, is_v4
from .models.cache import make_latent_cache
from .models.config import ModelArgs
from .layout import CheckpointError
from .loading import (cast_weight, entry_nbytes, install_weights, is_block_fp8, load_tokenizer, only_torch_bin,
                      read_config, read_model_folder, resolve_model_path, tensor_headers)
from .generate import Snapshots
from .models.block import DecoderLayer

LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.")  # MLA checkpoints: model.layers.N; V4: layers.N

FORWARD, FORWARD_UNCACHED, TRIM, RESET, STOP, SNAPSHOT, RESTORE = 1, 2, 3, 4, 5, 6, 7
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def layer_bytes(folder: Path, args: ModelArgs) -> tuple[list[int], int]:
    """Bytes on disk of each main layer, and of the rest (embedding, norm, head)."""
    per_layer, rest = [0] * args.num_hidden_layers, 0
    for name, entry in tensor_headers(folder).items():
        m = LAYER.match(name)
        if m is None:
            rest += entry_nbytes(entry)
        elif int(m.group(1)) < args.num_hidden_layers:
            per_layer[int(m.group(1))] += entry_nbytes(entry)
    return per_layer, rest


def split_layers(per_layer: Sequence[int], rest: int, ranks: int, counts: Optional[Sequence[int]] = None) -> list[range]:
    """Contiguous layer ranges, one per rank: `counts` layers each, or balanced by bytes (rank 0
    also carries `rest`)."""
    n = len(per_layer)
    if counts is not None:
        if len(counts) != ranks or sum(counts) != n or min(counts) < 1:
            raise ValueError(f"--layers-split {list(counts)}: expected {ranks} positive counts summing to {n}")
    else:
        total, counts, start = sum(per_layer) + rest, [], 0
        for r in range(ranks):
            target, size, stop = total / ranks - (rest if r == 0 else 0), 0, start
            while stop < n - (ranks - r - 1) and (size + per_layer[stop] / 2 <= target or stop == start):
                size += per_layer[stop]
                stop += 1
            counts.append(stop - start if r < ranks - 1 else n - start)
            start = stop
    starts = [sum(counts[:r]) for r in range(ranks)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


class Stage(nn.Module):
    """Layers `layers` of the model; with `ends`, also the embedding, the final norm and the head
    (DeepSeek-V4: also the hyper head)."""

    def __init__(self, args, layers: range, ends: bool, mtp: bool = False):
        super().__init__()
        self.args, self.span, self.v4 = args, layers, is_v4(args)
        if self.v4:
            from .models.deepseek_v4.model import Block, HyperHead, MTPBlock

            self.layers = [Block(args, i) for i in layers]
            if ends:
                self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
                self.hc_head = HyperHead(args.hidden_size, args.hc_mult, args.hc_eps, args.rms_norm_eps)
                self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
                self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
            if mtp:
                self.mtp = MTPBlock(args)
            return
        self.layers = [DecoderLayer(args, i) for i in layers]
        if ends:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            if not args.tie_word_embeddings:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if mtp:  # beside the head on rank 0, where drafting happens
            from .models.mtp import MTP

            self.mtp = MTP(args)

    def make_cache(self, kv_bits=None, kv_group_size: int = 64) -> list:
        if self.v4:
            from .models.deepseek_v4.cache import make_v4_cache

            if kv_bits:
                raise ValueError("--kv-bits is not supported for deepseek_v4 yet")
            return make_v4_cache(self.args, self.span)
        return [make_latent_cache(kv_bits, kv_group_size) for _ in self.layers]

    def embed_input(self, tokens: mx.array) -> mx.array:
        if not self.v4:
            return self.embed_tokens(tokens)
        h = self.embed(tokens)
        return mx.broadcast_to(h[:, :, None], (*h.shape[:2], self.args.hc_mult, h.shape[-1]))

    def run(self, h: mx.array, cache: Sequence, tokens: Optional[mx.array] = None) -> mx.array:
        if self.v4:
            cache = cache if cache[0] is not None else self.make_cache()
            for layer, c in zip(self.layers, cache):
                h = layer(h, tokens, c)
            return h
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        return h


def stage_name(name: str, span: range) -> Optional[str]:
    """A model-layout tensor name -> its name in the stage holding `span`, or None if elsewhere."""
    m = LAYER.match(name)
    if m is not None:
        i = int(m.group(1))
        return f"layers.{i - span.start}.{name[m.end():]}" if i in span else None
    if span.start != 0:
        return None
    return name[len("model."):] if name.startswith("model.") else name  # V4 names have no prefix


def model_name(local: str, span: range, v4: bool = False) -> str:
    """The inverse of `stage_name`: a stage's module path -> the model's (for per-module quantization)."""
    prefix = "" if v4 else "model."
    if local.startswith("layers."):
        index, rest = local[len("layers."):].split(".", 1)
        return f"{prefix}layers.{int(index) + span.start}.{rest}"
    return local if v4 or local.startswith(("lm_head", "mtp.")) else "model." + local


def load_stage(folder: Path, span: range, dtype=None, mtp: bool = False, expert_memory_gb=None) -> Stage:
    """Build a stage and read only its own tensors (the others are never loaded). With `mtp`,
    rank 0's stage also holds the MTP layer. `expert_memory_gb`: this rank's routed experts are
    streamed from its folder into that budget (`experts_on_disk`; `stage.expert_stream`)."""
    mtp = mtp and span.start == 0
    if is_block_fp8(read_config(folder)) or only_torch_bin(folder):  # they would be read whole on every rank
        raise CheckpointError(f"{folder}: block-FP8 and .bin checkpoints load directly in one process only; "
                              "for a pipeline, convert it first: python -m convert --hf-path ... --mlx-path ...")
    args, defaults, quant_params, mapped = read_model_folder(folder, mtp)
    weights = {}
    for name, value in mapped.items():
        local = stage_name(name, span)
        if local is not None:
            weights[local] = cast_weight(name, value, dtype)
    stage = Stage(args, span, ends=span.start == 0, mtp=mtp)
    stream = None
    if expert_memory_gb is not None:
        from .experts_on_disk import stream_experts

        stream = stream_experts(stage, folder, weights, expert_memory_gb, quant_params,
                                lambda k, v: cast_weight(k, v, dtype), model_path=lambda p: model_name(p, span, stage.v4))
    install_weights(stage, weights, defaults, quant_params, folder, lambda p: model_name(p, span, stage.v4))
    mx.eval(stage.parameters())
    if stream is not None:
        stage.expert_stream = stream
    return stage


@contextmanager
def deadline(seconds: float, what: str):
    """Exit the process with a message if the block takes longer (a rank died or hangs)."""
    def expire():
        print(f"[rank {mx.distributed.init().rank()}] no answer after {seconds:.0f} s {what}: "
              "a rank died or the network is down; stopping.", file=sys.stderr, flush=True)
        os._exit(3)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _header(cmd: int, a: int = 0, b: int = 0, dtype: int = 0) -> mx.array:
    return mx.array([cmd, a, b, dtype], dtype=mx.int32)


class RemoteCache:
    """Rank 0's stand-in for the caches of another rank's layers: mirrors their length, and
    forwards rewinds along the ring (trims; for DeepSeek-V4, snapshots and restores)."""

    def __init__(self, pipe: "PipelineModel"):
        self.pipe, self.offset = pipe, 0

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        if n:
            self.pipe.send_ring(_header(TRIM, n))
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return not self.pipe.stage.v4

    def snapshot(self, settled: bool = False) -> int:
        self.pipe.send_ring(_header(SNAPSHOT, self.offset, int(settled)))
        return self.offset

    def restore(self, offset: int) -> None:
        self.pipe.send_ring(_header(RESTORE, offset))
        self.offset = offset

    def consistent(self) -> bool:
        return True  # the other ranks finish a step (or stop the pipeline)

    @property
    def nbytes(self) -> int:
        return 0  # held on the other ranks

    @property
    def state(self) -> tuple:
        return ()  # nothing held here

    @property
    def meta_state(self) -> str:
        raise NotImplementedError("the caches of a pipeline live on several ranks: they cannot be saved from rank 0")


class PipelineModel:
    """On rank 0: behaves like `Model` for generation (hidden, logits, make_cache, __call__)."""

    def __init__(self, stage: Stage, group, spans: list[range], timeout: float):
        self.stage, self.group, self.spans, self.timeout = stage, group, spans, timeout
        self.args = stage.args
        self.model_type = stage.args.model_type

    def __contains__(self, key) -> bool:
        return key in self.stage  # "mtp": loaded with its MTP layer

    def parameters(self):
        return self.stage.parameters()

    def make_cache(self, kv_bits=None, kv_group_size: int = 64) -> list:
        """Fresh caches on every rank, plain or quantized (the other ranks make theirs on RESET)."""
        local = self.stage.make_cache(kv_bits, kv_group_size)
        self.send_ring(_header(RESET, kv_bits or 0, kv_group_size))
        return local + [RemoteCache(self)]

    def make_draft_cache(self):
        if self.stage.v4:
            from .models.deepseek_v4.cache import make_v4_cache

            n = self.args.num_hidden_layers
            return make_v4_cache(self.args, range(n, n + 1))[0]
        return make_latent_cache()

    def send_ring(self, header: mx.array) -> None:
        mx.eval(mx.distributed.send(header, 1, group=self.group))

    def hidden(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        local = len(self.stage.layers)
        cache = cache if cache is not None else [None] * (local + 1)
        h = self.stage.run(self.stage.embed_input(tokens), cache[:local], tokens)
        B, L = h.shape[:2]
        self.send_ring(_header(FORWARD if cache[local] is not None else FORWARD_UNCACHED, B, L, DTYPES.index(h.dtype)))
        if self.stage.v4:
            mx.eval(mx.distributed.send(tokens.astype(mx.int32), 1, group=self.group))
        mx.eval(mx.distributed.send(h, 1, group=self.group))
        with deadline(self.timeout, f"waiting for rank {self.group.size() - 1}'s activations"):
            h = mx.distributed.recv_like(h, self.group.size() - 1, group=self.group)
            mx.eval(h)
        if cache[local] is not None:
            cache[local].offset += L
        return h if self.stage.v4 else self.stage.norm(h)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.stage.v4:
            return self.stage.head(self.stage.norm(self.stage.hc_head(hidden)))
        if self.args.tie_word_embeddings:
            return self.stage.embed_tokens.as_linear(hidden)
        return self.stage.lm_head(hidden)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        return self.logits(self.hidden(tokens, cache))

    def draft_logits(self, hidden: mx.array, next_tokens: mx.array, cache=None) -> mx.array:
        if self.stage.v4:
            return self.stage.head(self.stage.mtp(hidden, self.stage.embed(next_tokens), next_tokens, cache))
        mtp = self.stage.mtp
        return mtp.head(mtp(hidden, mtp.embed(next_tokens, self.stage.embed_tokens), cache), self.logits)

    def stop(self) -> None:
        self.send_ring(_header(STOP))


class Worker:
    """Ranks > 0: runs its stage on whatever the previous rank sends, until rank 0 says stop."""

    def __init__(self, stage: Stage, group, timeout: float):
        self.stage, self.group, self.timeout = stage, group, timeout

    def serve(self) -> None:
        rank, size, stage = self.group.rank(), self.group.size(), self.stage
        cache, snapshots = stage.make_cache(), Snapshots()
        shape = (stage.args.hc_mult, stage.args.hidden_size) if stage.v4 else (stage.args.hidden_size,)
        while True:
            header = mx.distributed.recv((4,), mx.int32, rank - 1, group=self.group)  # idle: no deadline
            cmd, a, b, dtype = (int(v) for v in header.tolist())
            if rank < size - 1:
                mx.eval(mx.distributed.send(header, rank + 1, group=self.group))
            if cmd == STOP:
                return
            if cmd == TRIM:
                for c in cache:
                    c.trim(a)
                continue
            if cmd == RESET:  # a: kv_bits (0: plain), b: kv_group_size
                cache, snapshots = stage.make_cache(a or None, b), Snapshots()
                continue
            if cmd == SNAPSHOT:  # a: the offset, b: settled (the same keeping rule as rank 0's)
                snapshots.record(a, [c.snapshot() for c in cache], bool(b))
                continue
            if cmd == RESTORE:
                at, snap = snapshots.before(a)
                if at != a or snap is None:
                    raise RuntimeError(f"rank {rank}: no snapshot at {a} tokens to restore (have {sorted(snapshots.kept)})")
                for c, s in zip(cache, snap):
                    c.restore(s)
                continue
            with deadline(self.timeout, f"waiting for rank {rank - 1}'s activations"):
                tokens = None
                if stage.v4:
                    tokens = mx.distributed.recv((a, b), mx.int32, rank - 1, group=self.group)
                    mx.eval(tokens)  # now: messages arrive in order
                    if rank < size - 1:
                        mx.eval(mx.distributed.send(tokens, rank + 1, group=self.group))
                h = mx.distributed.recv((a, b, *shape), DTYPES[dtype], rank - 1, group=self.group)
                mx.eval(h)
            h = stage.run(h, cache if cmd == FORWARD else [None] * len(cache), tokens)
            mx.eval(mx.distributed.send(h, (rank + 1) % size, group=self.group))


def folder_fingerprint(folder: Path) -> int:
    """config.json and the tensor index (names, shapes, dtypes) of a folder, as a 31-bit number."""
    h = hashlib.sha256(Path(folder, "config.json").read_bytes())
    h.update(repr(sorted((k, v["shape"], v["dtype"]) for k, v in tensor_headers(folder).items())).encode())
    return int(h.hexdigest()[:7], 16)


def pipeline(path_or_repo, layers_split: Optional[Sequence[int]] = None, timeout: float = 300.0, group=None,
             mtp: bool = False, expert_memory_gb: Optional[float] = None):
    """Call on every rank of an `mlx.launch` job. Rank 0 gets (PipelineModel, tokenizer); the other
    ranks get (Worker, None) and call `worker.serve()`, which returns when rank 0 calls `model.stop()`.
    `mtp=True` loads the MTP layer on rank 0 for speculative decoding across the pipeline.
    `expert_memory_gb`: each rank streams its own routed experts within that budget (see `load`)."""
    group = group or mx.distributed.init()
    folder = resolve_model_path(path_or_repo)
    mine = folder_fingerprint(folder)
    prints = mx.distributed.all_gather(mx.array([mine], dtype=mx.int32), group=group)
    if len(set(prints.tolist())) != 1:
        raise CheckpointError(
            f"rank {group.rank()}: the ranks have different model folders or versions (fingerprints "
            f"{prints.tolist()}); give every Mac the same converted folder"
        )
    args = args_from_config(read_config(folder))
    per_layer, rest = layer_bytes(folder, args)
    spans = split_layers(per_layer, rest, group.size(), layers_split)
    stage = load_stage(folder, spans[group.rank()], mtp=mtp, expert_memory_gb=expert_memory_gb)
    if group.rank() != 0:
        return Worker(stage, group, timeout), None
    model = PipelineModel(stage, group, spans, timeout)
    if hasattr(stage, "expert_stream"):  # rank 0's counters, for the chat summary
        model.expert_stream = stage.expert_stream
    return model, load_tokenizer(folder)
