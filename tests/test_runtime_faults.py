"""Runtime faults in a chat: damaged cache files, a /save that fails mid-write, stdin that is not
UTF-8, a prompt longer than the context, and Ctrl-C during prefill and during decode (the next turn
must equal a fresh run of the same history)."""

import io
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chat  # noqa: E402

from mlx_deepseek import load  # noqa: E402
from mlx_deepseek.models.cache import LatentCache  # noqa: E402

ARGS = dict(system=None, max_tokens=12, hide_thinking=False, min_p=0.0, top_k=0, repetition_penalty=None, seed=None,
            prefill_step_size=4, mtp=False)


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return load(checkpoint("v3"))


def session(tiny, **overrides):
    out = io.StringIO()
    return chat.Chat(*tiny, SimpleNamespace(**{**ARGS, **overrides}), {"temp": 0.0, "top_p": 0.0}, out=out), out


def snapshot(s):
    return ([dict(m) for m in s.messages], list(s.cache.tokens),
            [[np.array(a) for a in c.state] for c in s.cache.cache])


def same(a, b):
    return a[0] == b[0] and a[1] == b[1] and all(
        len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y)) for x, y in zip(a[2], b[2]))


def damaged(data: bytes, how: str) -> bytes:
    if how == "truncated":
        return data[: len(data) // 2]
    if how == "a flipped bit in the data":
        return data[:-100] + bytes([data[-100] ^ 0x10]) + data[-99:]
    return data[:20] + bytes([data[20] ^ 0x01]) + data[21:]  # in the header


@pytest.mark.parametrize("how", ["truncated", "a flipped bit in the data", "a flipped bit in the header"])
def test_a_damaged_cache_file_is_refused_and_the_conversation_is_untouched(how, tiny, tmp_path):
    s, out = session(tiny)
    s.turn("first")
    s.command(f"/save {tmp_path / 'c.safetensors'}")
    s.turn("second")
    before = snapshot(s)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damaged((tmp_path / "c.safetensors").read_bytes(), how))
    s.command(f"/load {bad}")
    assert "Could not load (the conversation is unchanged)" in out.getvalue()
    assert same(snapshot(s), before)
    s.command(f"/load {tmp_path / 'missing.safetensors'}")
    assert "no such file" in out.getvalue() and same(snapshot(s), before)


def test_a_save_that_fails_mid_write_leaves_the_old_file_intact(tiny, tmp_path, monkeypatch):
    s, out = session(tiny)
    s.turn("first")
    file = tmp_path / "c.safetensors"
    s.command(f"/save {file}")
    old = file.read_bytes()
    s.turn("second")
    real = mx.save_safetensors

    def full_disk(path, arrays, metadata=None):
        real(path, arrays, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:1000])  # half written ...
        raise OSError(28, "No space left on device")            # ... when the disk fills up

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    s.command(f"/save {file}")
    assert "Could not save (any earlier" in out.getvalue() and "No space left" in out.getvalue()
    assert file.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]
    monkeypatch.undo()
    fresh, _ = session(tiny)
    fresh.command(f"/load {file}")
    assert len(fresh.messages) == 2  # the old file still loads: the first turn


def test_stdin_that_is_not_utf8(checkpoint):
    result = subprocess.run([sys.executable, str(Path(chat.__file__)), "--model", str(checkpoint("v3")), "--temp", "0",
                             "--max-tokens", "4"], input=b"hello \xff\xfe world \xc3", capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert b"[prompt" in result.stdout and b"Traceback" not in result.stderr


def test_a_prompt_longer_than_the_context(checkpoint, capsys):
    folder = checkpoint("v3")
    assert chat.main(["--model", str(folder), "--prompt", "word " * 3000, "--max-tokens", "8"]) == 0
    assert "The conversation is full" in capsys.readouterr().out


class Interrupt:
    """Ctrl-C at the n-th latent-cache update of the run (mid-forward: some layers updated, some not)."""

    def __init__(self, monkeypatch, at: int):
        self.calls, self.at = 0, at
        real = LatentCache.update_and_fetch

        def update(cache, latent, rope):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
            return real(cache, latent, rope)

        monkeypatch.setattr(LatentCache, "update_and_fetch", update)


@pytest.mark.parametrize("where,after", [("prefill", 2), ("prefill", 0.6), ("decode", 2), ("decode", 3 * 5 + 1)])
def test_ctrl_c_leaves_conversation_and_cache_consistent(where, after, tiny, monkeypatch, tmp_path):
    """3 layers, each cache update counted: Ctrl-C part-way through a forward pass of the prefill
    (chunks of 4 tokens) or of a decode step. Then the next turn equals a fresh run of the history."""
    s, out = session(tiny)
    s.turn("a first question")
    s.messages.append({"role": "user", "content": "and now a longer second question"})
    prompt = s.prompt_tokens()[0]
    s.messages.pop()
    common = next((i for i, (a, b) in enumerate(zip(s.cache.tokens, prompt)) if a != b), len(s.cache.tokens))
    prefill_updates = 3 * -(-(len(prompt) - common) // 4)
    if where == "prefill":  # the n-th update, or that share of the way through the prefill
        at = after if after >= 1 else int(after * prefill_updates)
    else:                   # the n-th update after the prefill
        at = prefill_updates + after
    assert (at <= prefill_updates) == (where == "prefill"), (at, prefill_updates)
    Interrupt(monkeypatch, at)
    s.turn("and now a longer second question")
    assert "[stopped]" in out.getvalue()
    held = min(c.offset for c in s.cache.cache)  # the prompt was all in every layer only if decode had begun
    assert (held < len(prompt)) == (where == "prefill"), (held, len(prompt))
    monkeypatch.undo()
    history = [dict(m) for m in s.messages]
    s.command(f"/save {tmp_path / 'interrupted.safetensors'}")  # what was interrupted saves and loads
    restored, _ = session(tiny)
    restored.command(f"/load {tmp_path / 'interrupted.safetensors'}")
    fresh, _ = session(tiny)
    fresh.messages = history
    for chat_ in (s, restored, fresh):
        chat_.turn("go on")
    assert s.messages == fresh.messages == restored.messages
    assert s.cache.tokens == fresh.cache.tokens == restored.cache.tokens
    assert all(c.offset == len(s.cache.tokens) for c in s.cache.cache)


def test_ctrl_c_in_a_terminal_during_prefill_then_the_conversation_goes_on(tiny, checkpoint, tmp_path):
    """A real SIGINT (pexpect) while a long prompt is prefilled one token at a time."""
    pexpect = pytest.importorskip("pexpect")
    saved = tmp_path / "after-ctrl-c.safetensors"
    child = pexpect.spawn(sys.executable, [str(Path(chat.__file__)), "--model", str(checkpoint("v3")), "--temp", "0",
                                           "--max-tokens", "12", "--prefill-step-size", "1"], encoding="utf-8",
                          timeout=120)
    child.expect(">>> ")
    child.sendline("tell me " * 300)
    time.sleep(1.5)  # well inside the ~2,400-token prefill
    child.sendintr()
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    child.sendline(f"/save {saved}")
    child.expect("Saved 2 messages")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    restored, _ = session(tiny)
    restored.command(f"/load {saved}")
    assert restored.messages[1] == {"role": "assistant", "content": ""}  # stopped before any reply
    assert len(restored.cache.tokens) < len(restored.prompt_tokens()[0])
    fresh, _ = session(tiny)
    fresh.messages = [dict(m) for m in restored.messages]
    restored.turn("go on")
    fresh.turn("go on")
    assert restored.messages == fresh.messages and restored.cache.tokens == fresh.cache.tokens
