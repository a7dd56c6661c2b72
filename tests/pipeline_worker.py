"""Run by tests/test_pipeline.py under `mlx.launch -n 2 --backend ring`: every rank loads its slice;
rank 0 computes logits and a two-turn greedy conversation (with MTP drafting, or a 4-bit latent
cache, if asked); each rank
reports what it loaded."""

import json
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_deepseek.generate import PromptCache, stream_generate
from mlx_deepseek.pipeline import pipeline

folder, out = sys.argv[1], sys.argv[2]
mtp = "--mtp" in sys.argv
kv_bits = 4 if "--kv-bits-4" in sys.argv else None
eos_off = "--no-eos" in sys.argv  # random weights: never stop early
budget = float(sys.argv[sys.argv.index("--expert-memory") + 1]) if "--expert-memory" in sys.argv else None
model, tokenizer = pipeline(folder, timeout=60, mtp=mtp, expert_memory_gb=budget)
stage = model.stage
report = {"rank": mx.distributed.init().rank(), "layers": [stage.span.start, stage.span.stop],
          "bytes": sum(v.nbytes for _, v in tree_flatten(stage.parameters()))}
streamed = getattr(stage, "expert_stream", None)
if tokenizer is None:
    model.serve()
else:
    if eos_off:
        tokenizer._eos_token_ids = set()
    prompt = list(range(3, 40))
    report["logits"] = np.array(model(mx.array([prompt]))).tolist()
    conversation = PromptCache(model, kv_bits=kv_bits, kv_group_size=32)
    first = list(stream_generate(model, tokenizer, prompt, max_tokens=24, prompt_cache=conversation, mtp=mtp))
    second_prompt = prompt + [r.token for r in first] + list(range(50, 60))
    turn = list(stream_generate(model, tokenizer, second_prompt, max_tokens=24, prompt_cache=conversation, mtp=mtp))
    report.update(first=[r.token for r in first], second=[r.token for r in turn], reused=turn[-1].stats.reused_tokens,
                  main_steps=turn[-1].stats.main_steps)
    model.stop()
if streamed is not None:  # each rank's own expert reads
    report["experts"] = {"slots": streamed.slots, "picks": streamed.stats.picks, "misses": streamed.stats.misses}
with open(f"{out}.rank{report['rank']}.json", "w") as f:
    json.dump(report, f)
