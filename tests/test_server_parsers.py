"""Reasoning and tool-call parsing of hand-written DeepSeek outputs, whole and split at every point."""

import json

import pytest

from mlx_deepseek.server.parsers import ReplyParser, parse_reply

R1 = ("<think>\nThe user wants weather.\n</think>\n\nLet me check."
      "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
      '{"city": "Paris", "unit": "c"}\n```<｜tool▁call▁end｜>\n'
      "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
V31 = ("Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
       '{"city": "北京"}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"tz": "UTC"}'
       "<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
DSML = ("<think>plan</think>Checking.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n"
        '<｜DSML｜parameter name="city" string="true">New "York"</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"noop\">\n</｜DSML｜invoke>\n</｜DSML｜function_calls>")
V4 = DSML.replace("function_calls>", "tool_calls>")

EXPECTED = {
    "r1": (R1, "\nThe user wants weather.\n", "Let me check.",
           [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {})]),
    "v3.1": (V31, "", "Sure.", [("get_weather", {"city": "北京"}), ("get_time", {"tz": "UTC"})]),
    "dsml": (DSML, "plan", "Checking.\n\n", [("get_weather", {"city": 'New "York"', "days": 3}), ("noop", {})]),
    "v4": (V4, "plan", "Checking.\n\n", [("get_weather", {"city": 'New "York"', "days": 3}), ("noop", {})]),
}


def streamed(text, pieces, thinking=False):
    """Feed `text` cut into `pieces`; collect reasoning, content and each call's name and argument deltas."""
    p = ReplyParser(thinking)
    got = {"reasoning": "", "content": "", "calls": []}
    bounds = [0, *pieces, len(text)]
    events = [e for a, b in zip(bounds, bounds[1:]) for e in p.feed(text[a:b])] + p.flush()
    for e in events:
        if e[0] == "call":
            assert e[1] == len(got["calls"])
            got["calls"].append([e[2].name, ""])
        elif e[0] == "arguments":
            got["calls"][e[1]][1] += e[2]
        else:
            got[e[0]] += e[1]
    got["final_calls"] = [c.name for c in p.calls]
    return got


@pytest.mark.parametrize("name", list(EXPECTED))
def test_whole_reply(name):
    text, reasoning, content, calls = EXPECTED[name]
    r = parse_reply(text)
    assert (r["reasoning"], r["content"]) == (reasoning, content)
    assert [(c.name, json.loads(c.arguments)) for c in r["tool_calls"]] == calls
    assert len({c.id for c in r["tool_calls"]}) == len(calls)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_split_at_every_point_and_into_single_characters(name):
    text, reasoning, content, calls = EXPECTED[name]
    for cuts in [[i] for i in range(1, len(text))] + [list(range(1, len(text)))]:
        got = streamed(text, cuts)
        assert (got["reasoning"], got["content"]) == (reasoning, content), cuts
        assert [(n, json.loads(a)) for n, a in got["calls"]] == calls, cuts


def test_arguments_stream_before_the_call_ends():
    p = ReplyParser()
    events = p.feed(R1[: R1.index('"unit"')])
    assert ("call", 0) == events[-2][:2] and events[-2][2].name == "get_weather"
    assert events[-1] == ("arguments", 0, '{"city": "Paris", ')


def test_template_opened_think_and_thinking_off():
    assert parse_reply("I reason</think>\n\nAnswer", thinking=True) == {
        "reasoning": "I reason", "content": "Answer", "tool_calls": []}
    assert parse_reply("</think>Answer")["content"] == "</think>Answer"  # no open think: plain text
    assert parse_reply("Hm<think>x</think>y") == {"reasoning": "x", "content": "Hmy", "tool_calls": []}
    assert streamed("unfinished thought</th", [5], thinking=True)["reasoning"] == "unfinished thought</th"


@pytest.mark.parametrize("bad", [
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\nno fence<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\": 1",   # cut off
    "<｜tool▁calls▁begin｜>garbage",
    "<｜DSML｜function_calls>\n<｜DSML｜invoke>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>",
    '<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="n" string="false">not json'
    "</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>",
    '<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n',                                   # cut off
])
def test_malformed_calls_come_back_as_plain_text(bad):
    for cuts in ([], list(range(1, len(bad)))):
        got = streamed("Before " + bad, [c + 7 for c in cuts])
        assert got["content"] == "Before " + bad
        assert got["final_calls"] == []  # (a stream may have shown the start of a call cut off later)


def test_a_good_call_before_a_broken_one_is_kept():
    good = "<｜tool▁call▁begin｜>a<｜tool▁sep｜>{}<｜tool▁call▁end｜>"
    for text, broken in [("<｜tool▁calls▁begin｜>" + good + "<｜tool▁call▁begin｜>broken", "<｜tool▁call▁begin｜>broken"),
                         (DSML[DSML.index("<｜DSML｜f"):DSML.index('<｜DSML｜invoke name="noop"')] + "<｜DSML｜invoke oops",
                          "\n<｜DSML｜invoke oops")]:
        for cuts in ([], list(range(1, len(text)))):
            got = streamed(text, cuts)
            assert got["final_calls"] == ["a" if "a<" in text else "get_weather"]
            assert got["content"] == broken, cuts


def test_no_tools_leaves_markers_as_text():
    assert parse_reply(V31, tools=False)["content"] == V31


def test_stream_deltas_are_valid_openai_chunks_and_add_up_to_the_calls():
    """The server's delta objects for a streamed R1 reply with tool calls, read by the openai client's own types."""
    from openai.types.chat import ChatCompletionChunk

    from mlx_deepseek.server.app import chat_events

    parser = ReplyParser(thinking=False)
    deltas = [d for i in range(0, len(R1), 7) for d in chat_events(parser, R1[i : i + 7])]
    deltas += chat_events(parser, "", final=True)
    calls, reasoning, content = {}, "", ""
    for d in deltas:
        chunk = ChatCompletionChunk.model_validate({"id": "x", "object": "chat.completion.chunk", "created": 0,
                                                    "model": "m", "choices": [{"index": 0, "delta": d}]})
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            entry["arguments"] += tc.function.arguments or ""
    assert reasoning == EXPECTED["r1"][1] and content == EXPECTED["r1"][2]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == EXPECTED["r1"][3]
    assert all(c["id"].startswith("call_") for c in calls.values())
