"""DeepSeek MLA + MoE models (V2, V2-Lite, V2.5, V3, R1, V3.1, Kimi-K2) on MLX with a latent KV cache."""

from .models.cache import LatentCache, latent_bytes_per_token
from .models.config import ConfigError, ModelArgs
from .layout import CheckpointError
from .loading import load, load_model
from .models.deepseek import Model

__all__ = [
    "CheckpointError", "ConfigError", "LatentCache", "Model", "ModelArgs",
    "latent_bytes_per_token", "load", "load_model",
]
