"""Batched decoding on a BatchLatentCache: B sequences of different lengths in one forward, each
reply token for token its reply decoded alone (greedy)."""

import mlx.core as mx
import pytest

from mlx_deepseek import load_model
from mlx_deepseek.models.cache import BatchLatentCache

PROMPTS = [[5, 17, 33], [9, 4, 120, 77, 31, 8, 2, 61, 140, 3, 12], [44] * 300]


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint("v3"))


def decode_batch(model, prompts, steps, kv_bits=None, join_at=None):
    """Prefill each prompt alone, then decode all rows together; a last prompt may join mid-way."""
    def prefilled(p):
        cache = model.make_cache(kv_bits, 32)
        logits = model(mx.array([p]), cache=cache)[:, -1]
        return cache, int(mx.argmax(logits, axis=-1).item())

    late = prompts[-1] if join_at is not None else None
    first = prompts[:-1] if join_at is not None else prompts
    caches, tokens = zip(*(prefilled(p) for p in first))
    batch = [BatchLatentCache.from_caches([c[layer] for c in caches]) for layer in range(len(model.layers))]
    out = [[t] for t in tokens]
    for step in range(steps):
        if step == join_at:
            cache, t = prefilled(late)
            for layer, b in enumerate(batch):
                b.extend(BatchLatentCache.from_caches([cache[layer]]))
            out.append([t])
        last = mx.array([[o[-1]] for o in out])
        nxt = mx.argmax(model(last, cache=batch)[:, -1], axis=-1).tolist()
        for o, t in zip(out, nxt):
            o.append(t)
    return out, batch


def alone(model, prompt, n, kv_bits=None):
    from mlx_deepseek.generate import PromptCache, decode, prefill

    pc = PromptCache(model, kv_bits, 32)
    logits, _ = prefill(pc, prompt)
    steps = decode(pc, logits, lambda l: mx.argmax(l, axis=-1))
    return [next(steps) for _ in range(n)]


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_batched_greedy_equals_each_alone(model, kv_bits):
    out, batch = decode_batch(model, PROMPTS, 6, kv_bits)
    for prompt, got in zip(PROMPTS, out):
        assert got == alone(model, prompt, 7, kv_bits)
    assert batch[0].lengths == [len(p) + 6 for p in PROMPTS]


def test_a_sequence_joins_and_one_leaves_between_steps(model):
    out, batch = decode_batch(model, PROMPTS, 6, join_at=3)
    assert out[-1] == alone(model, PROMPTS[-1], 4)
    assert out[0] == alone(model, PROMPTS[0], 7)
    # the first leaves; its extracted cache continues alone exactly as it would have
    mine = [b.extract(0) for b in batch]
    for b in batch:
        b.keep([1, 2])
    assert batch[0].lengths == [len(PROMPTS[1]) + 6, len(PROMPTS[2]) + 3]
    nxt = model(mx.array([[out[0][-1]]]), cache=mine)[:, -1]
    assert int(mx.argmax(nxt, axis=-1).item()) == alone(model, PROMPTS[0], 8)[-1]
    rest = mx.argmax(model(mx.array([[out[1][-1]], [out[2][-1]]]), cache=batch)[:, -1], axis=-1).tolist()
    assert rest == [alone(model, PROMPTS[1], 8)[-1], alone(model, PROMPTS[2], 5)[-1]]


def test_batch_refuses_more_than_one_token_per_row(model):
    cache = model.make_cache()
    model(mx.array([[1, 2]]), cache=cache)
    batch = [BatchLatentCache.from_caches([c]) for c in cache]
    with pytest.raises(ValueError, match="one new token"):
        model(mx.array([[1, 2]]), cache=batch)
