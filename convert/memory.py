"""A source checkpoint converted in memory, for `load()`: block-FP8 checkpoints as published
(DeepSeek-V4's too: its FP4 experts carried as mxfp4, the FP8 rest dequantized), and
quantize-on-load (`load(path, quantize=4)`).

It runs the converter's own plan (the same reading, FP8 dequantization, quantization and layout as
`python -m convert`), only the bytes go into arrays instead of shards; so a model loaded this way
is the converted folder loaded, value for value. Each job is produced and evaluated before the
next: memory holds what is already converted plus one source tensor in float (one layer's stack
of experts while it is assembled, when it stays unquantized).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import mlx.core as mx

from mlx_deepseek.models.config import ModelArgs

from mlx_deepseek.models import is_v4

from .cli import DTYPES, _source_dtype
from .plan import make_plan
from .plan_v4 import make_plan_v4
from .recipes import V4_DEFAULT, Quant, Recipe
from .sources import open_source


def convert_in_memory(folder: Path, config: dict, args: ModelArgs, quant: Optional[Quant],
                      dtype: Optional[mx.Dtype], keep_mtp: bool) -> tuple[dict[str, mx.array], Optional[dict]]:
    """(tensors in the converter's output layout, its `quantization` block or None)."""
    source = open_source(folder, config)
    quant = quant.validate("quantize") if quant else None
    dtype = dtype or DTYPES[_source_dtype(config)]
    if is_v4(args):  # FP4 experts carried as mxfp4 (lossless); the rest float, or `quant`
        plan = make_plan_v4(source, args, Recipe(quant, V4_DEFAULT), dtype, drop_mtp=not keep_mtp)
    else:
        plan = make_plan(source, args, Recipe(quant), dtype, drop_mtp=not keep_mtp)
    weights: dict[str, mx.array] = {}
    for job in plan.jobs:
        produced = job.produce()
        for out in job.outputs:
            pieces, got = [], 0
            while got < out.nbytes:
                piece = next(produced)
                pieces.append(piece.reshape(-1))
                got += piece.nbytes
            array = (pieces[0] if len(pieces) == 1 else mx.concatenate(pieces)).reshape(out.shape)
            if got != out.nbytes or array.dtype != out.dtype:
                raise RuntimeError(f"internal error: {out.name} produced {got} bytes of {array.dtype}, "
                                   f"planned {out.nbytes} of {out.dtype}")
            mx.eval(array)
            weights[out.name] = array
            del pieces
        if next(produced, None) is not None:
            raise RuntimeError(f"internal error: {[o.name for o in job.outputs]} produced more than planned")
    return weights, plan.quantization_config()
