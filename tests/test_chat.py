"""chat.py: templates of the real DeepSeek tokenizers, reasoning display, and a session driven as a person would."""

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import jinja2
import pytest
from test_generate import real_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import chat  # noqa: E402

from mlx_deepseek import load_model  # noqa: E402

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nThe user adds. 2+2=4.\n</think>\n\nIt is 4."},
    {"role": "user", "content": "和 3+3 呢？"},
]


def reference_render(tokenizer, messages):
    """The template rendered by plain Jinja, as the model authors wrote it."""
    template = jinja2.Environment().from_string(tokenizer.chat_template)
    special = {k: tokenizer.convert_ids_to_tokens(getattr(tokenizer, f"{k}_id")) for k in ("bos_token", "eos_token")}
    return template.render(messages=messages, add_generation_prompt=True, **special)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_model(checkpoint("v3"))


@pytest.mark.parametrize("name", ["deepseek-r1", "deepseek-v3", "deepseek-v3.1", "deepseek-v2", "deepseek-v2.5"])
def test_conversation_renders_as_the_reference_template(name, model, tmp_path):
    tokenizer = real_tokenizer(name, tmp_path)
    session = chat.Chat(model, tokenizer, SimpleNamespace(system="Be brief."), {})
    session.messages = list(CONVERSATION)
    tokens, _ = session.prompt_tokens()
    expected = reference_render(tokenizer, [{"role": "system", "content": "Be brief."}] + CONVERSATION)
    assert tokenizer.decode(tokens) == expected
    assert tokens == tokenizer.encode(expected, add_special_tokens=False)


def test_r1_drops_past_reasoning_and_opens_a_think(model, tmp_path):
    session = chat.Chat(model, real_tokenizer("deepseek-r1", tmp_path), SimpleNamespace(system=None), {})
    session.messages = list(CONVERSATION)
    tokens, thinking = session.prompt_tokens()
    text = session.tokenizer.decode(tokens)
    assert "The user adds" not in text and "It is 4." in text and thinking


def render(pieces, hide=False, thinking=False):
    out = io.StringIO()
    r = chat.ThinkingRenderer(out, hide, thinking)
    for p in pieces:
        r.write(p)
    r.close()
    return out.getvalue()


def test_thinking_is_dimmed_under_a_header_even_when_tags_are_split():
    shown = render(["Hm<thi", "nk>let me see</th", "ink>\n\nFour."])
    assert shown == f"Hm{chat.DIM}{chat.BOLD}Thinking…{chat.RESET}{chat.DIM}\nlet me see{chat.RESET}\n{chat.BOLD}Answer:{chat.RESET}\nFour.\n"
    assert render(["<think>secret</think>", "Four."], hide=True) == "Four.\n"
    # R1's template opens the <think> itself: the reply starts inside it
    assert render(["secret</think>Four."], hide=True, thinking=True) == "Four.\n"


def test_chat_session_in_a_terminal(checkpoint, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    folder = checkpoint("v3")
    saved = tmp_path / "conversation.safetensors"
    child = pexpect.spawn(sys.executable, [str(Path(chat.__file__)), "--model", str(folder), "--temp", "0",
                                           "--max-tokens", "1000"], encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendline("hello")
    child.expect(r"\[prompt (\d+) tokens \(0 reused\)")
    child.expect(">>> ")
    child.sendline("again")
    child.expect(r"\[prompt \d+ tokens \((\d+) reused\)")
    assert int(child.match.group(1)) > 0
    child.expect(">>> ")
    child.sendline(f"/save {saved}")
    child.expect("Saved 4 messages")
    child.sendline("/reset")
    child.expect("New conversation")
    child.sendline(f"/load {saved}")
    child.expect("Loaded 4 messages")
    child.sendline("a long answer please")
    child.expect(r"\S{20}")  # the reply is streaming ...
    child.sendintr()          # ... Ctrl-C stops it and keeps the conversation
    child.expect(r"\[stopped\]")
    child.expect(">>> ")
    child.sendline("/stats")
    child.expect(r"\[prompt \d+ tokens")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert saved.exists()


def test_full_context_says_so_and_offers_reset(model, checkpoint):
    from mlx_deepseek import load

    _, tokenizer = load(checkpoint("v3"))
    out = io.StringIO()
    args = SimpleNamespace(system=None, max_tokens=4090, hide_thinking=False, min_p=0.0, top_k=0,
                           repetition_penalty=None, seed=None, prefill_step_size=512)
    session = chat.Chat(model, tokenizer, args, {"temp": 0.0, "top_p": 0.0}, out=out)
    session.turn("this prompt plus 4090 tokens does not fit in 4096")
    assert "The conversation is full" in out.getvalue() and "/reset" in out.getvalue()
    assert session.messages == [] and session.cache.tokens == []


def test_mtp_flag_reports_acceptance(capsys):
    from conftest import SHARED

    assert chat.main(["--model", str(SHARED / "models/tinyseek-py"), "--mtp", "--prompt", "import os",
                      "--max-tokens", "24"]) == 0
    assert "MTP acceptance" in capsys.readouterr().out
    assert chat.main(["--model", "x", "--mtp", "--repetition-penalty", "1.1"]) == 2
