"""DeepSeek-V4 (Flash, Pro): hyper-connections, sliding-window MQA with compressed entries (CSA, HCA)."""

from .config import V4Args
from .model import Model

__all__ = ["V4Args", "Model"]
