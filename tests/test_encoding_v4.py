"""mlx_deepseek.encoding_v4 against DeepSeek's reference V4 encoder (its outputs in tests/data/encoding_v4_cases.json)."""

import copy
import json
from types import SimpleNamespace

import pytest
from encoding_cases import Cases

from mlx_deepseek import encoding_v4 as v4

_cases = Cases("encoding_v4_cases.json", v4)
CASES, CONVERSATIONS, REPLIES = _cases.data, _cases.conversations, _cases.replies
encode = _cases.encode
globals().update(_cases.reference_tests())
globals().update(_cases.chat_test("deepseek_v4", "deepseek-v4"))


def test_the_fixtures_cover_what_they_should():
    assert CASES["source"]["sha256"] == "bdbd57c132a1b3725042323d02b98b9d1df28e5f388f134399555d041f5055e0"
    assert len(CONVERSATIONS) >= 12 and len(REPLIES) >= 12
    assert sum(name.startswith("DeepSeek's own golden case") for name in CONVERSATIONS) == 4


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_every_rendered_assistant_turn_parses_back(name):
    """Each assistant message of each conversation, rendered alone as the model would write it, parses back."""
    case = CONVERSATIONS[name]
    thinking = case["options"]["thinking_mode"] == "thinking"
    for m in case["messages"]:
        if m["role"] != "assistant" or m.get("wo_eos"):
            continue
        text = v4._render(m, None, True, thinking, True)
        parsed = v4.parse_reply(text, thinking, strict=True)
        assert parsed["content"] == (m.get("content") or "")
        assert parsed["reasoning_content"] == (m.get("reasoning_content") or "" if thinking else "")
        for got, sent in zip(parsed["tool_calls"], m.get("tool_calls", []), strict=True):
            assert got["function"]["name"] == sent["function"]["name"]
            try:
                expected = json.loads(sent["function"]["arguments"])
            except ValueError:
                expected = {"arguments": sent["function"]["arguments"]}
            assert json.loads(got["function"]["arguments"]) == expected
        assert v4.parse_reply(text.removesuffix(v4.EOS), thinking, strict=True) == parsed  # EOS is optional


def test_request_tools_attach_to_the_system_prompt_or_a_new_one():
    tools = CONVERSATIONS["tool definitions only"]["messages"][0]["tools"]
    expected = CONVERSATIONS["tool definitions only"]["prompt"]
    bare = [{"role": "system", "content": "You can look up the weather."}, {"role": "user", "content": "Weather in Paris?"}]
    assert v4.encode_messages(bare, tools=tools) == expected
    alone = v4.encode_messages(bare[1:], tools=tools)
    assert alone.startswith(v4.BOS + "\n\n## Tools\n")  # an empty system prompt, then the tools and alone.endswith("<｜User｜>Weather in Paris?<｜Assistant｜><think>")


def test_dict_arguments_render_as_the_same_json_string_would():
    # The reference would wrap a dict as one parameter "arguments"; clients that send dicts mean the object.
    as_string = {"function": {"name": "f", "arguments": '{"a": 1, "b": "x"}'}}
    as_dict = {"function": {"name": "f", "arguments": {"a": 1, "b": "x"}}}
    assert v4.render_tool_call(as_dict) == v4.render_tool_call(as_string)
    with pytest.raises(ValueError, match="JSON object"):
        v4.render_tool_call({"function": {"name": "f", "arguments": "[1, 2]"}})


def test_generation_prompt_can_be_left_off():
    case = CONVERSATIONS["multi-turn thinking: past reasoning dropped"]
    prompt = encode(case["messages"], {**case["options"], "add_generation_prompt": False})
    assert prompt + v4.ASSISTANT + v4.THINK_START == case["prompt"]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="reasoning_effort"):
        v4.encode_messages([{"role": "user", "content": "x"}], reasoning_effort="low")
    with pytest.raises(ValueError, match="role"):
        v4.encode_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="string"):
        v4.encode_messages([{"role": "user", "content": [{"type": "text", "text": "x"}]}])


def test_lenient_parse_of_a_reply_cut_off_while_thinking():
    assert v4.parse_reply("still thinking about it") == {
        "role": "assistant", "content": "", "reasoning_content": "still thinking about it", "tool_calls": []}
    assert v4.parse_reply("no tags", thinking=False)["content"] == "no tags"


def test_split_reasoning_of_raw_replies():
    raw = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "because</think>answer"}]
    assert v4.split_reasoning(raw)[1] == {"role": "assistant", "content": "answer", "reasoning_content": "because"}
    assert v4.split_reasoning(raw[:1]) == raw[:1]


def test_the_server_keeps_the_reasoning_of_a_call_only_turn(tmp_path):
    """V4 keeps all reasoning once tools are defined: a call-only turn sent back with content null
    and `reasoning_content` renders with its reasoning, as the reference does."""
    from test_generate import real_tokenizer

    from mlx_deepseek.server.app import Server

    case = CONVERSATIONS["tool call, result, answer, next question: tools keep all reasoning"]
    system, *messages = copy.deepcopy(case["messages"])
    tools = system.pop("tools")
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls") and not m["content"]:
            m["content"] = None
    server = Server(SimpleNamespace(served_model_name="m", model="m", mtp=False))
    server.tokenizer, server.model_type = real_tokenizer("deepseek-v4", tmp_path), "deepseek_v4"
    tokens = server.chat_prompt({"messages": [system, *messages], "tools": tools})[0]
    assert server.tokenizer.decode(tokens) == case["prompt"]
