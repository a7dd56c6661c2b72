"""Writes encoding_v32_cases.json: our conversations and replies, run through DeepSeek's REFERENCE V3.2 encoder.

    python tests/data/make_encoding_v32_cases.py --reference PATH/encoding_dsv32.py

The reference is DeepSeek's encoding/encoding_dsv32.py from the deepseek-ai/DeepSeek-V3.2 Hugging Face
repo. It is not part of this repository and no installed package ships it; this script imports the
file given by --reference and refuses any file whose sha256 is not the pinned one (the copy we used:
see SOURCE). The conversations are those of make_encoding_v4_cases.py that V3.2's format has (no
reasoning_effort, task, latest_reminder or wo_eos; tool results in call order, as text; tool
arguments JSON), plus V3.2's own: tool results after the last user message (where <think> reopens),
developer messages, drop_thinking=False. The replies are V4's with the block renamed function_calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_encoding_v4_cases as v4  # noqa: E402  (its conversations and helpers)
from make_encoding_v4_cases import CALC, NOW, TOOL_TURN, WEATHER, assistant, call, system, tool, user  # noqa: E402

SHA256 = "2671eab1472a8784bdf9d98a2b88492f802d6508931e016d5aab52a6925c3db8"
SOURCE = {
    "reference": "deepseek-ai/DeepSeek-V3.2, encoding/encoding_dsv32.py (Hugging Face; revision "
                 "a7e62ac04ecb2c0a54d736dc46601c5606cf10a6 is the one other projects pin)",
    "sha256": SHA256,
    "read_from": "github.com/cywinski/non-assistant-sampling at ffe2c22f754160d80a844b4c2bfac99ceb88a679, "
                 "src/mask/encoding_dsv32.py (a verbatim vendored copy: its tools section has the blank lines "
                 "that DeepSeek's own encoding/test_output.txt shows, as mirrored in github.com/ai-dynamo/dynamo "
                 "at ab84711406d9625ec863c973365a3a49ed7c253b, lib/llm/tests/data/deepseek-v3.2/). Not the vLLM "
                 "copy (vllm-project/vllm vllm/tokenizers/deepseek_v32_encoding.py, e.g. at "
                 "c3a66b951c65fd1ba91b63d5ed9477ec605f619d) nor SGLang's (sgl-project/sglang "
                 "python/sglang/srt/entrypoints/openai/encoding_dsv32.py at 008b79d2358b08adf9b6c879625030f890c8c4e2): "
                 "both are edited (vLLM also reads and returns a `reasoning` key; SGLang raises its own "
                 "error class and takes dict arguments) and, as stored, their tools section has no blank lines",
    "generated_by": "tests/data/make_encoding_v32_cases.py",
}
OUT = Path(__file__).resolve().parent / "encoding_v32_cases.json"

V4_NAMES_THAT_APPLY = [
    "plain, thinking", "plain, chat", "system prompt, chat", "system prompt, thinking",
    "multi-turn thinking: past reasoning dropped", "multi-turn thinking, drop_thinking=False: past reasoning kept",
    "multi-turn chat: reasoning never rendered", "ends with an assistant turn: its reasoning kept, earlier dropped",
    "ends with an assistant turn, chat", "tool definitions only", "tool definitions, chat",
    "tool call, result, answer, next question: tools keep all reasoning", "tool call, result, answer, next question, chat",
    "tool result followed by user text in the same turn", "unicode: Chinese, emoji, accents", "unicode tool arguments",
    "empty contents", "empty contents, chat", "no system prompt, multi-turn, reasoning missing on a past turn",
    "consecutive user messages merge", "response_format on the system prompt",
    "multi-turn tool use across two user turns, thinking",
]
# V4's names describe V4's rules; where V3.2 renders the same conversation by other rules, say so.
RENAMED = {
    "multi-turn thinking, drop_thinking=False: past reasoning kept": "multi-turn thinking, drop_thinking=False",
    "tool call, result, answer, next question: tools keep all reasoning": "tool call, result, answer, next question",
    "tool result followed by user text in the same turn": "tool result, then a user message",
    "consecutive user messages merge": "consecutive user messages (each closed by <｜Assistant｜>)",
}
PARALLEL = [
    system("", [WEATHER, CALC]),
    user("Weather in Oslo and Lima, and 17*23?"),
    assistant("Let me check both cities and compute.", tool_calls=[
        call("a", "get_weather", '{"city": "Oslo"}'),
        call("b", "get_weather", '{"city": "Lima", "unit": "fahrenheit"}'),
        call("c", "calculate", '{"expression": "17*23", "precision": 0, "options": {"exact": true, "base": [10]}}'),
    ]),
    tool("a", '{"temperature": -3}'), tool("b", "72 F\nsunny"), tool("c", "391"),
    user("Thanks. Summarise."),
]
AGENT_LOOP = [  # two rounds of calls after the last user message: both keep their reasoning
    system("You are a helpful Assistant.", [WEATHER, NOW]),
    user("Is it warmer in Rome than in Paris right now?"),
    assistant("", reasoning="First the time, then both cities.", tool_calls=[call("t", "now", "{}")]),
    tool("t", "2026-12-02T17:00:00Z"),
    assistant("Checking both.", reasoning="Now the weather.", tool_calls=[
        call("r", "get_weather", '{"city": "Rome"}'), call("p", "get_weather", '{"city": "Paris"}')]),
    tool("r", '{"temperature": 15}'), tool("p", '{"temperature": 9}'),
]
V32_CONVERSATIONS = [
    ("parallel tool calls, JSON arguments, results in call order, chat", PARALLEL, {"thinking_mode": "chat"}),
    ("parallel tool calls, thinking", PARALLEL, {"thinking_mode": "thinking"}),
    ("tool call with no arguments, a None result", [
        system("Tools.", [NOW, CALC]), user("Time?"),
        assistant("", reasoning="call it", tool_calls=[call("t1", "now", "{}")]), tool("t1", None),
    ], {"thinking_mode": "thinking"}),
    ("results after the last user reopen <think>; reasoning after it kept", AGENT_LOOP, {"thinking_mode": "thinking"}),
    ("results after the last user, chat", AGENT_LOOP, {"thinking_mode": "chat"}),
    ("results after the last user, drop_thinking=False", AGENT_LOOP, {"thinking_mode": "thinking", "drop_thinking": False}),
    ("agent loop then a new question: earlier reasoning dropped", AGENT_LOOP + [
        assistant("Rome is warmer: 15 °C against 9 °C.", reasoning="15 > 9."), user("And Oslo?"),
    ], {"thinking_mode": "thinking"}),
    ("a call without reasoning after the last user (thinking)", [
        system("", [WEATHER]), user("Weather in Lima?"),
        assistant("", tool_calls=[call("l", "get_weather", '{"city": "Lima"}')]), tool("l", "sunny"),
    ], {"thinking_mode": "thinking"}),
    ("developer message with tools and a response format, last", [
        system("You are DeepSeek."), user("Earlier question"), assistant("Earlier answer", reasoning="old"),
        {"role": "developer", "content": "Search the web: best ramen in Tokyo", "tools": [WEATHER],
         "response_format": {"type": "json_object"}},
    ], {"thinking_mode": "thinking"}),
    ("developer message, chat", [
        {"role": "developer", "content": "Old instructions"}, assistant("ok", reasoning="r"), user("New question"),
    ], {"thinking_mode": "chat"}),
    ("developer message before the last user, drop_thinking=False keeps it", [
        {"role": "developer", "content": "Old instructions"}, assistant("ok", reasoning="r"), user("New question"),
    ], {"thinking_mode": "thinking", "drop_thinking": False}),
    ("tools on the system prompt, multi-turn, drop_thinking=False", TOOL_TURN, {"thinking_mode": "thinking", "drop_thinking": False}),
]


def conversations():
    named = {name: (messages, options) for name, messages, options in v4.CONVERSATIONS}
    return [(RENAMED.get(n, n), *named[n]) for n in V4_NAMES_THAT_APPLY] + V32_CONVERSATIONS


REPLIES = [(name, text.replace("｜DSML｜tool_calls", "｜DSML｜function_calls"), mode) for name, text, mode in v4.REPLIES]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--reference", type=Path, required=True, help="DeepSeek's encoding_dsv32.py (sha256-pinned)")
    args = p.parse_args()
    ref = v4.load_reference(args.reference, SHA256, "DeepSeek-V3.2 encoder")
    v4.write_cases(ref, conversations(), REPLIES, SOURCE, OUT)


if __name__ == "__main__":
    main()
