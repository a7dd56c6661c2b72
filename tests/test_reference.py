"""Our model against Hugging Face transformers' DeepseekV2/V3ForCausalLM on the same weights."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import reference_logits, rel_err, tokens

from mlx_deepseek import load_model

VARIANTS = ["v2_lite", "v2", "v3", "kimi", "v3_plain"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_sequence_logits(variant, checkpoint, reference):
    folder = checkpoint(variant)
    toks = tokens(48, batch=2)
    ours = np.array(load_model(folder)(mx.array(toks)))
    assert ours.shape == (2, 48, 160)
    assert rel_err(ours, reference_logits(reference(folder), toks)) < 1e-4


def test_yarn_far_past_original_context(checkpoint, reference):
    """original_max_position_embeddings is 32: 640 tokens are 20x past it, decoded through the cache."""
    folder = checkpoint("v3")
    toks = tokens(640, seed=1)
    ref = reference_logits(reference(folder), toks)
    model = load_model(folder)
    cache = model.make_cache()
    prefill = np.array(model(mx.array(toks[:, :600]), cache=cache))
    steps = [np.array(model(mx.array(toks[:, i : i + 1]), cache=cache)) for i in range(600, 640)]
    assert rel_err(prefill, ref[:, :600]) < 1e-4
    assert rel_err(np.concatenate(steps, axis=1), ref[:, 600:]) < 1e-4


@pytest.mark.parametrize("variant", ["v2_lite", "v3"])
def test_greedy_continuation_matches_transformers_generate(variant, checkpoint, reference):
    folder = checkpoint(variant)
    prompt = tokens(12, seed=2)
    with torch.no_grad():
        expected = reference(folder).generate(
            torch.tensor(prompt), max_new_tokens=32, do_sample=False, min_new_tokens=32
        )[0, 12:].tolist()
    model = load_model(folder)
    cache = model.make_cache()
    logits = model(mx.array(prompt), cache=cache)
    got = []
    for _ in range(32):
        nxt = int(mx.argmax(logits[0, -1]).item())
        got.append(nxt)
        logits = model(mx.array([[nxt]]), cache=cache)
    assert got == expected


def test_bfloat16_within_bfloat16_tolerance(checkpoint, reference):
    """A bf16 checkpoint run in bf16 stays within bf16 rounding of the float32 reference on the same weights."""
    folder = checkpoint("v3", dtype="bfloat16")
    toks = tokens(32, seed=3)
    model = load_model(folder)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    ours = np.array(model(mx.array(toks)).astype(mx.float32))
    ref = reference_logits(reference(folder), toks)
    assert rel_err(ours, ref) < 5e-2
    # and the top choice agrees wherever the reference is not a near tie
    top2 = np.sort(ref, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 0.05 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1))[clear].all()


def test_trained_tinyseek_validation_loss_matches_torch():
    """shared/models/tinyseek-py's README: loss 2.788288 (torch) on the first 64 validation windows."""
    from conftest import SHARED

    folder = SHARED / "models" / "tinyseek-py"
    ids = np.load(folder / "validation" / "val_ids.npy")
    model = load_model(folder)
    windows = mx.array(np.stack([ids[w * 256 : w * 256 + 257] for w in range(64)]))
    total = 0.0
    for batch in range(0, 64, 16):
        x = windows[batch : batch + 16]
        logits = model(x[:, :-1])
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        total += -mx.take_along_axis(lp, x[:, 1:, None], axis=-1).sum().item()
    assert total / (64 * 256) == pytest.approx(2.788288, abs=2e-5)
