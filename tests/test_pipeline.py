"""Pipeline parallelism: 2 ranks on this machine over loopback (ring backend) equal one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import rel_err

from mlx_deepseek import load
from mlx_deepseek.generate import PromptCache, stream_generate
from mlx_deepseek.loading import safetensors_header
from mlx_deepseek.pipeline import split_layers

WORKER = Path(__file__).with_name("pipeline_worker.py")
MLX_LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; sys.exit(main())"


def mlx_launch(script, *args, port):
    """`mlx.launch -n 2 --backend ring` on loopback, with this interpreter."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-c", MLX_LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(port),
         "--python", sys.executable, str(script), *map(str, args)],
        capture_output=True, text=True, timeout=300, env=env)


def launch(folder, out, *extra, port=5510):
    """The worker on 2 ranks; rank 0's report."""
    proc = mlx_launch(WORKER, folder, out, *extra, port=port)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(Path(f"{out}.rank0.json").read_text())


PROMPT = list(range(3, 40))


def two_turns(model, tokenizer, **cache_options) -> tuple[list[int], list[int]]:
    """In one process: the greedy conversation the worker holds across ranks (two turns, one cache)."""
    conversation = PromptCache(model, **cache_options)
    first = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=24, prompt_cache=conversation)]
    second = [r.token for r in stream_generate(model, tokenizer, PROMPT + first + list(range(50, 60)),
                                               max_tokens=24, prompt_cache=conversation)]
    return first, second


def test_two_ranks_equal_one_process(checkpoint, tmp_path):
    folder = checkpoint("v3", num_hidden_layers=4)
    r0 = launch(folder, tmp_path / "r")
    r1 = json.loads((tmp_path / "r.rank1.json").read_text())

    model, tokenizer = load(folder)
    assert rel_err(np.array(r0["logits"]), np.array(model(mx.array([PROMPT])))) < 1e-5
    assert [r0["first"], r0["second"]] == list(two_turns(model, tokenizer)) and r0["reused"] > len(PROMPT)

    # each rank loaded only its layers (rank 0 also the embedding, norm and head)
    assert r0["layers"][0] == 0 and r0["layers"][1] == r1["layers"][0] and r1["layers"][1] == 4
    header, _ = safetensors_header(folder / "model.safetensors")
    sizes = {n: i["data_offsets"][1] - i["data_offsets"][0] for n, i in header.items() if n != "__metadata__"}

    def on_disk(lo, hi, ends):
        return sum(v for n, v in sizes.items() if (n.startswith("model.layers.") and lo <= int(n.split(".")[2]) < hi)
                   or (ends and not n.startswith("model.layers.")))

    assert r0["bytes"] == on_disk(*r0["layers"], True) and r1["bytes"] == on_disk(*r1["layers"], False)


def test_mtp_drafting_across_the_pipeline_changes_nothing_but_the_steps(tmp_path):
    from conftest import SHARED

    folder = SHARED / "models" / "tinyseek-py"
    r0 = launch(folder, tmp_path / "m", "--mtp", port=5590)
    assert [r0["first"], r0["second"]] == list(two_turns(*load(folder)))
    assert 0 < r0["main_steps"] < 24


@pytest.mark.parametrize("mtp", [False, True])
def test_deepseek_v4_across_two_ranks_equals_one_process(tmp_path, mtp):
    """V4's hyper-connection streams and token ids cross the ring; its snapshot rewinds are mirrored
    on the other rank (the second turn rewinds into the first reply; MTP rejections rewind a step)."""
    from checkpoints import build_v4

    folder = build_v4("v4_mtp", "native")
    r0 = launch(folder, tmp_path / "v4", "--no-eos", *(["--mtp"] if mtp else []), port=5710 + 40 * mtp)
    model, tokenizer = load(folder, mtp=mtp)
    tokenizer._eos_token_ids = set()
    assert rel_err(np.array(r0["logits"]), np.array(model(mx.array([PROMPT])))) < 1e-5
    conversation = PromptCache(model)
    first = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=24, prompt_cache=conversation,
                                              mtp=mtp)]
    second = [r.token for r in stream_generate(model, tokenizer, PROMPT + first + list(range(50, 60)), max_tokens=24,
                                               prompt_cache=conversation, mtp=mtp)]
    assert [r0["first"], r0["second"]] == [first, second]


def test_a_quantized_cache_across_the_pipeline_equals_one_process(checkpoint, tmp_path):
    folder = checkpoint("v3", num_hidden_layers=4)
    r0 = launch(folder, tmp_path / "q", "--kv-bits-4", port=5630)
    assert [r0["first"], r0["second"]] == list(two_turns(*load(folder), kv_bits=4, kv_group_size=32))


def test_streamed_experts_across_the_pipeline_equal_one_process(checkpoint, tmp_path):
    """Each rank streams its own layers' experts within its own budget: room for 9 experts, shared
    by the rank's MoE layers (layer 0 is dense)."""
    folder = checkpoint("v3", num_hidden_layers=4)
    model, tokenizer = load(folder)
    per_expert = 3 * 64 * 32 * 4  # three float32 (32 x 64) matrices
    r0 = launch(folder, tmp_path / "s", "--expert-memory", 9.5 * per_expert / 1e9, port=5670)
    r1 = json.loads((tmp_path / "s.rank1.json").read_text())
    assert [r0["first"], r0["second"]] == list(two_turns(model, tokenizer))
    assert rel_err(np.array(r0["logits"]), np.array(model(mx.array([PROMPT])))) < 1e-5
    for r in (r0, r1):
        moe_layers = len([i for i in range(*r["layers"]) if i >= 1])
        assert r["experts"]["slots"] == 9 // moe_layers < 16 and r["experts"]["misses"] > 0


def test_split_by_bytes_and_by_count():
    assert [list(r) for r in split_layers([10, 10, 10, 10], 0, 2)] == [[0, 1], [2, 3]]
    assert [list(r) for r in split_layers([1, 30, 30, 30], 40, 2)] == [[0, 1], [2, 3]]
    assert [list(r) for r in split_layers([5] * 6, 0, 3, [1, 2, 3])] == [[0], [1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="6 positive counts|3 positive counts"):
        split_layers([5] * 6, 0, 3, [1, 2])


def test_a_rank_with_another_model_folder_is_refused(checkpoint, tmp_path):
    a, b = checkpoint("v3"), checkpoint("v3", num_hidden_layers=4)
    script = tmp_path / "w.py"
    script.write_text(
        "import mlx.core as mx\nfrom mlx_deepseek.pipeline import pipeline\n"
        f"pipeline({str(a)!r} if mx.distributed.init().rank() == 0 else {str(b)!r})\n")
    proc = mlx_launch(script, port=5530)
    assert "the ranks have different model folders" in proc.stdout + proc.stderr


def test_a_rank_that_stops_answering_stops_the_others_with_a_message(checkpoint, tmp_path):
    folder = checkpoint("v3", num_hidden_layers=4)
    script = tmp_path / "hang.py"
    script.write_text(
        "import time, mlx.core as mx\nfrom mlx_deepseek.pipeline import pipeline\n"
        f"model, tokenizer = pipeline({str(folder)!r}, timeout=5)\n"
        "if tokenizer is None:\n    time.sleep(120)  # a Mac that froze\n"
        "else:\n    model(mx.array([[1, 2, 3]]))\n")
    proc = mlx_launch(script, port=5650)
    assert "no answer after 5 s waiting for rank 1's activations" in proc.stdout + proc.stderr
