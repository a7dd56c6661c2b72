"""Run by tests/test_pipeline.py under `mlx.launch -n 2 --backend ring`: every rank loads its slice;
rank 0 computes logits and a two-turn greedy conversation; each rank reports what it loaded."""

import json
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_deepseek.generate import PromptCache, stream_generate
from mlx_deepseek.pipeline import pipeline

folder, out = sys.argv[1], sys.argv[2]
split = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else None
model, tokenizer = pipeline(folder, layers_split=split, timeout=60)
stage = model.stage
report = {"rank": mx.distributed.init().rank(), "layers": [stage.span.start, stage.span.stop],
          "bytes": sum(v.nbytes for _, v in tree_flatten(stage.parameters()))}
if tokenizer is None:
    model.serve()
else:
    prompt = list(range(3, 40))
    report["logits"] = np.array(model(mx.array([prompt]))).tolist()
    conversation = PromptCache(model)
    first = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=16, prompt_cache=conversation)]
    second_prompt = prompt + first + list(range(50, 60))
    turn = list(stream_generate(model, tokenizer, second_prompt, max_tokens=16, prompt_cache=conversation))
    report.update(first=first, second=[r.token for r in turn], reused=turn[-1].stats.reused_tokens)
    model.stop()
with open(f"{out}.rank{report['rank']}.json", "w") as f:
    json.dump(report, f)
