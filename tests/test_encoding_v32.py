"""mlx_deepseek.encoding_v32 against DeepSeek's reference V3.2 encoder (its outputs in tests/data/encoding_v32_cases.json)."""

import copy
from types import SimpleNamespace

import pytest
from encoding_cases import Cases

from mlx_deepseek import encoding_v32 as v32
from mlx_deepseek.chat_template import render

_cases = Cases("encoding_v32_cases.json", v32)
CASES, CONVERSATIONS, REPLIES = _cases.data, _cases.conversations, _cases.replies
encode = _cases.encode
globals().update(_cases.reference_tests())
globals().update(_cases.chat_test("deepseek_v32", "deepseek-v3.2"))


def test_the_fixtures_cover_what_they_should():
    assert CASES["source"]["sha256"] == "2671eab1472a8784bdf9d98a2b88492f802d6508931e016d5aab52a6925c3db8"
    assert len(CONVERSATIONS) >= 30 and len(REPLIES) >= 12
    prompts = [c["prompt"] for c in CONVERSATIONS.values()]
    for mark in ("<function_results>", v32.FUNCTION_CALLS_OPEN, "# The user's message is: ", "## Response Format"):
        assert any(mark in p for p in prompts), mark
    assert any(p.endswith("</function_results>\n\n<think>") for p in prompts)  # results after the last user
    assert {c["options"]["thinking_mode"] for c in CONVERSATIONS.values()} == {"thinking", "chat"}


def test_a_v4_block_is_not_a_v32_call():
    text = '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>'
    assert v32.parse_reply(text, thinking=False)["tool_calls"] == []
    assert len(v32.parse_reply(text.replace("tool_calls", "function_calls"), thinking=False)["tool_calls"]) == 1


@pytest.mark.parametrize("name", [None, "get_weather"])
def test_the_servers_forced_call_opening_is_how_this_encoding_writes_a_call(name):
    from mlx_deepseek.server.tool_choice import call_format, call_opening

    fmt = call_format("deepseek_v32", "")
    block = v32.V32.render_tool_calls([{"function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}])
    assert fmt == "v3.2" and block.startswith(call_opening(fmt, name))


def test_request_tools_attach_to_the_system_prompt_or_a_new_one():
    case = CONVERSATIONS["tool definitions only"]
    bare = [{k: v for k, v in m.items() if k != "tools"} for m in case["messages"]]
    assert v32.encode_messages(bare, tools=case["messages"][0]["tools"]) == case["prompt"]
    alone = v32.encode_messages(bare[1:], tools=case["messages"][0]["tools"])
    assert alone.startswith(v32.BOS + "\n\n## Tools\n\n") and alone.endswith("<｜Assistant｜><think>")


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="role"):
        v32.encode_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="without a matching call"):
        v32.encode_messages([{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}])
    with pytest.raises(ValueError, match="not JSON"):  # as the reference: V3.2 has no "arguments" fallback
        v32.render_tool_call({"function": {"name": "f", "arguments": "1/0"}})
    with pytest.raises(ValueError, match="developer"):
        v32.encode_messages([{"role": "developer", "content": ""}])


@pytest.mark.parametrize("thinking", [True, False])
def test_render_dispatches_deepseek_v32_to_this_encoding(thinking, tmp_path):
    from test_generate import real_tokenizer

    tokenizer = real_tokenizer("deepseek-v3.2", tmp_path)  # DeepSeek-V3.2's own tokenizer: no chat template
    assert not getattr(tokenizer, "chat_template", None)
    case = CONVERSATIONS["results after the last user reopen <think>; reasoning after it kept" if thinking
                         else "results after the last user, chat"]
    system, *messages = copy.deepcopy(case["messages"])
    tools = system.pop("tools")
    tokens, opens_think = render(tokenizer, [system, *messages], tools, "deepseek_v32",
                                 **({} if thinking else {"thinking": False}))
    assert tokenizer.decode(tokens) == case["prompt"] and opens_think is thinking
    # the format's markers are single tokens of V3.2's vocabulary, not spelled out
    for mark in (v32.BOS, v32.EOS, v32.USER, v32.ASSISTANT, v32.THINK_START, v32.THINK_END, v32.DSML):
        ids = tokenizer.encode(mark, add_special_tokens=False)
        assert len(ids) == 1, mark
        assert tokens.count(ids[0]) == case["prompt"].count(mark), mark
    assert tokens[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("name", ["results after the last user reopen <think>; reasoning after it kept",
                                  "results after the last user, chat", "agent loop then a new question: earlier reasoning dropped"])
def test_the_server_renders_a_request_as_the_reference(name, tmp_path):
    """An OpenAI request (tools in `tools`, calls with content null, reasoning in `reasoning_content`)
    through the server's own message handling gives the reference's prompt."""
    from test_generate import real_tokenizer

    from mlx_deepseek.server.app import Server

    case = CONVERSATIONS[name]
    system, *messages = copy.deepcopy(case["messages"])
    tools = system.pop("tools")
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls") and not m["content"]:
            m["content"] = None  # as OpenAI clients send a call-only turn
    server = Server(SimpleNamespace(served_model_name="m", model="m", mtp=False))
    server.tokenizer, server.model_type = real_tokenizer("deepseek-v3.2", tmp_path), "deepseek_v32"
    body = {"messages": [system, *messages], "tools": tools}
    if case["options"]["thinking_mode"] == "chat":
        body["reasoning_effort"] = "none"
    tokens, opens_think, tools_on, opening = server.chat_prompt(body)
    assert server.tokenizer.decode(tokens) == case["prompt"]
    assert opens_think is (case["options"]["thinking_mode"] == "thinking") and tools_on and opening is None
