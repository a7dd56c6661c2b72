import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402

# Real model configs, beside the checkout (see ../shared/configs/README.md).
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def checkpoint():
    """checkpoint(variant, dtype="float32", **overrides) -> folder written by transformers."""
    return checkpoints.build


@pytest.fixture(scope="session")
def reference():
    """reference(folder) -> transformers model on that folder, float32, eval mode (cached)."""
    import torch
    import transformers

    models = {}

    def get(folder):
        if folder not in models:
            models[folder] = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        return models[folder]

    return get


def reference_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor(tokens)).logits.float().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tokens(n: int, vocab: int = 160, seed: int = 0, batch: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).randint(2, vocab, (batch, n))
