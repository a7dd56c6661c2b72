"""The model families, by config.json `model_type`.

- the MLA family (`deepseek_v2`, `deepseek_v3`, `kimi_k2`): `config.ModelArgs`, `deepseek.Model`,
  built from the shared blocks (`rope`, `moe`, `quant`) and its own `mla`, `block`, `mtp`, `cache`;
- `deepseek_v4`: `deepseek_v4.V4Args`, `deepseek_v4.Model` (hyper-connections, compressed attention).
"""

from __future__ import annotations

from typing import Any

from .config import FAMILIES, ConfigError, ModelArgs

V4_TYPES = ("deepseek_v4",)
MODEL_TYPES = tuple(sorted(FAMILIES)) + V4_TYPES


def args_from_config(config: dict[str, Any]):
    """config.json -> the arguments of its family (ModelArgs or V4Args)."""
    model_type = config.get("model_type")
    if model_type in V4_TYPES:
        from .deepseek_v4 import V4Args

        return V4Args.from_dict(config)
    if model_type not in FAMILIES:
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported; expected one of "
                          f"{list(MODEL_TYPES)}")
    return ModelArgs.from_dict(config)


def model_class(args):
    if args.model_type in V4_TYPES:
        from .deepseek_v4 import Model
    else:
        from .deepseek import Model
    return Model


def is_v4(args) -> bool:
    return args.model_type in V4_TYPES
