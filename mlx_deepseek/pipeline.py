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
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from .models.config import ModelArgs
from .models.cache import make_latent_cache
from .layout import LAYER, CheckpointError
from .loading import (cast_weight, entry_nbytes, install_weights, is_block_fp8, load_tokenizer, only_torch_bin,
                      read_config, read_model_folder, resolve_model_path, tensor_headers)
from .models.block import DecoderLayer

FORWARD, FORWARD_UNCACHED, TRIM, RESET, STOP = 1, 2, 3, 4, 5
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
    """Layers `layers` of the model; with `ends`, also the embedding, the final norm and the head."""

    def __init__(self, args: ModelArgs, layers: range, ends: bool, mtp: bool = False):
        super().__init__()
        self.args, self.span = args, layers
        self.layers = [DecoderLayer(args, i) for i in layers]
        if ends:
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            if not args.tie_word_embeddings:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if mtp:  # beside the head on rank 0, where drafting happens
            from .models.mtp import MTP

            self.mtp = MTP(args)

    def run(self, h: mx.array, cache: Sequence) -> mx.array:
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
    return name[len("model."):] if name.startswith("model.") else name


def model_name(local: str, span: range) -> str:
    """The inverse of `stage_name`: a stage's module path -> the model's (for per-module quantization)."""
    if local.startswith("layers."):
        index, rest = local[len("layers."):].split(".", 1)
        return f"model.layers.{int(index) + span.start}.{rest}"
    return local if local.startswith(("lm_head", "mtp.")) else "model." + local


def load_stage(folder: Path, span: range, dtype=None, mtp: bool = False) -> Stage:
    """Build a stage and read only its own tensors (the others are never loaded). With `mtp`,
    rank 0's stage also holds the MTP layer."""
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
    install_weights(stage, weights, defaults, quant_params, folder, lambda p: model_name(p, span))
    mx.eval(stage.parameters())
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
    forwards rewinds along the ring."""

    def __init__(self, pipe: "PipelineModel"):
        self.pipe, self.offset = pipe, 0

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        if n:
            self.pipe.send_ring(_header(TRIM, n))
        self.offset -= n
        return n

    def is_trimmable(self) -> bool:
        return True

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
        self.send_ring(_header(RESET, kv_bits or 0, kv_group_size))
        return [make_latent_cache(kv_bits, kv_group_size) for _ in self.stage.layers] + [RemoteCache(self)]

    def send_ring(self, header: mx.array) -> None:
        mx.eval(mx.distributed.send(header, 1, group=self.group))

    def hidden(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        local = len(self.stage.layers)
        cache = cache if cache is not None else [None] * (local + 1)
        h = self.stage.run(self.stage.embed_tokens(tokens), cache[:local])
        B, L, _ = h.shape
        self.send_ring(_header(FORWARD if cache[local] is not None else FORWARD_UNCACHED, B, L, DTYPES.index(h.dtype)))
        mx.eval(mx.distributed.send(h, 1, group=self.group))
        with deadline(self.timeout, f"waiting for rank {self.group.size() - 1}'s activations"):
            h = mx.distributed.recv_like(h, self.group.size() - 1, group=self.group)
            mx.eval(h)
        if cache[local] is not None:
            cache[local].offset += L
        return self.stage.norm(h)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.stage.embed_tokens.as_linear(hidden)
        return self.stage.lm_head(hidden)

    def __call__(self, tokens: mx.array, cache: Optional[list] = None) -> mx.array:
        return self.logits(self.hidden(tokens, cache))

    def draft_logits(self, hidden: mx.array, next_tokens: mx.array, cache=None) -> mx.array:
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
        cache = [make_latent_cache() for _ in stage.layers]
        D = stage.args.hidden_size
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
                cache = [make_latent_cache(a or None, b) for _ in stage.layers]
                continue
            with deadline(self.timeout, f"waiting for rank {rank - 1}'s activations"):
                h = mx.distributed.recv((a, b, D), DTYPES[dtype], rank - 1, group=self.group)
                mx.eval(h)
            h = stage.run(h, cache if cmd == FORWARD else [None] * len(cache))
            mx.eval(mx.distributed.send(h, (rank + 1) % size, group=self.group))


def folder_fingerprint(folder: Path) -> int:
    """config.json and the tensor index (names, shapes, dtypes) of a folder, as a 31-bit number."""
    h = hashlib.sha256(Path(folder, "config.json").read_bytes())
    h.update(repr(sorted((k, v["shape"], v["dtype"]) for k, v in tensor_headers(folder).items())).encode())
    return int(h.hexdigest()[:7], 16)


def pipeline(path_or_repo, layers_split: Optional[Sequence[int]] = None, timeout: float = 300.0, group=None,
             mtp: bool = False):
    """Call on every rank of an `mlx.launch` job. Rank 0 gets (PipelineModel, tokenizer); the other
    ranks get (Worker, None) and call `worker.serve()`, which returns when rank 0 calls `model.stop()`.
    `mtp=True` loads the MTP layer on rank 0 for speculative decoding across the pipeline."""
    group = group or mx.distributed.init()
    folder = resolve_model_path(path_or_repo)
    mine = folder_fingerprint(folder)
    prints = mx.distributed.all_gather(mx.array([mine], dtype=mx.int32), group=group)
    if len(set(prints.tolist())) != 1:
        raise CheckpointError(
            f"rank {group.rank()}: the ranks have different model folders or versions (fingerprints "
            f"{prints.tolist()}); give every Mac the same converted folder"
        )
    args = ModelArgs.from_dict(read_config(folder))
    per_layer, rest = layer_bytes(folder, args)
    spans = split_layers(per_layer, rest, group.size(), layers_split)
    stage = load_stage(folder, spans[group.rank()], mtp=mtp)
    if group.rank() != 0:
        return Worker(stage, group, timeout), None
    return PipelineModel(stage, group, spans, timeout), load_tokenizer(folder)
