"""DeepSeek-V4 end to end: a published-layout checkpoint with V4's real tokenizer, converted by
`python -m convert` (default V4 recipe), chatted with in a terminal (pexpect) across turns,
with MTP drafting, cache reuse through the snapshot rewind, /save and /load."""

import subprocess
import sys
from pathlib import Path

import pytest
from checkpoints import build_v4

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("v4") / "v4-mlx"
    proc = subprocess.run([sys.executable, "-m", "convert", "--hf-path", str(build_v4("v4_chat", "native")),
                           "--mlx-path", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_chat_session_on_a_converted_v4_checkpoint(converted, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    saved = tmp_path / "v4.safetensors"
    child = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(converted), "--temp", "0",
                                           "--max-tokens", "12", "--mtp"], encoding="utf-8", timeout=180, cwd=str(ROOT))
    child.expect(">>> ")
    child.sendline("hello")
    child.expect(r"\[prompt (\d+) tokens \(0 reused\)")
    child.expect(r"MTP acceptance")
    child.expect(">>> ")
    child.sendline("and again, in other words")
    child.expect(r"\[prompt (\d+) tokens \((\d+) reused\)")
    total, reused = int(child.match.group(1)), int(child.match.group(2))
    assert 0 < reused < total
    child.expect(">>> ")
    child.sendline(f"/save {saved}")
    child.expect("Saved 4 messages")
    child.sendline("/reset")
    child.expect("New conversation")
    child.sendline(f"/load {saved}")
    child.expect("Loaded 4 messages")
    child.sendline("one more")
    child.expect(r"\[prompt \d+ tokens \((\d+) reused\)")
    assert int(child.match.group(1)) > 0  # the loaded cache is reused
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_one_shot_prompt_renders_with_the_v4_encoding(converted):
    proc = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--model", str(converted), "--temp", "0",
                           "--max-tokens", "6", "--no-thinking", "--prompt", "Hi"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[prompt" in proc.stdout + proc.stderr
