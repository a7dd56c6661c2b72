"""What DeepSeek-V3.2's and DeepSeek-V4's prompt formats share: special tokens, DSML tool calls
(rendered and parsed), the tools and response-format sections of a system prompt, and the history
rules both apply to reasoning.

The two formats (encoding_v32.py, encoding_v4.py) write a tool call the same way,
    <｜DSML｜BLOCK>\\n<｜DSML｜invoke name="NAME">\\n<｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>
    ...\\n</｜DSML｜invoke>\\n</｜DSML｜BLOCK>
after "\\n\\n", with BLOCK = `function_calls` (V3.2) or `tool_calls` (V4). A `Dialect` holds what
differs between them here: that name, the tools section's text, and what a tool call whose
arguments are not a JSON object becomes. How a conversation is walked (tool results, where
<think> opens) differs more and lives in each format's own module.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"

RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


class DSMLError(ValueError):
    """A reply that does not follow the format (thinking block, tool calls, end of sentence)."""


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


INVOKE, INVOKE_CLOSE, PARAMETER, PARAMETER_END = (f"<{DSML}invoke", f"</{DSML}invoke", f"<{DSML}parameter",
                                                   f"/{DSML}parameter")
INVOKE_END = INVOKE_CLOSE + ">\n"
INVOKE_NAME = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)  # "\n\n": a call without parameters
PARAMETER_BODY = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<\n?', re.DOTALL)


@dataclass(frozen=True)
class Dialect:
    """One DSML format: `block` names the calls' block; `tools_section` is the system prompt's tools
    text with "{schemas}" where the functions' JSON schemas go (one a line); `wrap_non_json`: a call
    whose arguments string is not JSON becomes one string parameter "arguments" (V4) or is an
    error (V3.2), as each reference does."""
    block: str
    tools_section: str
    wrap_non_json: bool

    @property
    def calls_open(self) -> str:
        """What a reply's calls start with (after its content); the block goes on with ">\\n"."""
        return f"\n\n<{DSML}{self.block}"

    @property
    def calls_end(self) -> str:
        return f"</{DSML}{self.block}>"

    # ------------------------------------------------------------ rendering

    def render_tools(self, tools: list[dict]) -> str:
        """The tools section of a system prompt; `tools` in OpenAI format ({"type": "function", "function": ...})."""
        return self.tools_section.replace("{schemas}", "\n".join(_json(t["function"]) for t in tools))

    def render_tool_calls(self, calls: list[dict]) -> str:
        """An assistant's OpenAI-format tool calls as the DSML block after its content ("" for none)."""
        if not calls:
            return ""
        return self.calls_open + ">\n" + "\n".join(map(self.render_tool_call, calls)) + "\n" + self.calls_end

    def render_tool_call(self, call: dict) -> str:
        """One OpenAI-format tool call as a DSML invoke. Arguments are a JSON object in a string (as
        OpenAI sends them) or already a dict."""
        function = call["function"]
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                if not self.wrap_non_json:
                    raise ValueError(f"tool call {function.get('name')!r}: arguments are not JSON: "
                                     f"{function['arguments']!r}") from None
                arguments = {"arguments": function["arguments"]}
        if not isinstance(arguments, dict):
            raise ValueError(f"tool call {function.get('name')!r}: arguments must be a JSON object, not {arguments!r}")
        params = [f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                  f'{v if isinstance(v, str) else _json(v)}</{DSML}parameter>' for k, v in arguments.items()]
        return f'<{DSML}invoke name="{function.get("name")}">\n' + "\n".join(params) + f"\n</{DSML}invoke>"

    # ------------------------------------------------------------ parsing

    def parse_reply(self, text: str, thinking: bool = True, strict: bool = False) -> dict:
        """A generated assistant turn -> {"role", "content", "reasoning_content", "tool_calls"}.

        `text` is what the model wrote after the prompt (after <think> in thinking mode), with or
        without the final <｜end▁of▁sentence｜>. Tool calls come back in OpenAI format with `arguments`
        a JSON string, as the references return them (no ids). A reply that breaks the format raises
        DSMLError when `strict`; otherwise it comes back as plain text: reasoning up to the first
        </think> (all of it if the reply never closed its reasoning), the rest as content, no calls.
        """
        try:
            return self._parse(text, thinking)
        except DSMLError:
            if strict:
                raise
        reasoning, content = "", text
        if thinking:
            reasoning, closed, content = text.partition(THINK_END)
            if not closed:
                reasoning, content = text, ""
        return {"role": "assistant", "content": content.removesuffix(EOS),
                "reasoning_content": reasoning.removesuffix(EOS), "tool_calls": []}

    def _parse(self, text: str, thinking: bool) -> dict:
        reasoning, pos = "", 0
        if thinking:
            end = text.find(THINK_END)
            call = text.find(self.calls_open)
            if end < 0 or 0 <= call < end:
                raise DSMLError("the reasoning is not closed by </think>")
            reasoning, pos = text[:end], end + len(THINK_END)
        eos, call = text.find(EOS, pos), text.find(self.calls_open, pos)
        calls = []
        if call >= 0 and (eos < 0 or call < eos):
            content = text[pos:call]
            calls, pos = self._parse_tool_calls(text, call + len(self.calls_open))
        else:
            content = text[pos:] if eos < 0 else text[pos:eos]
            pos = len(text) if eos < 0 else eos
        if text[pos:] not in ("", EOS):
            raise DSMLError(f"unexpected text after the reply: {text[pos:][:80]!r}")
        for token in (BOS, EOS, THINK_START, THINK_END, DSML):
            if token in content or token in reasoning:
                raise DSMLError(f"special token {token!r} inside the reply's text")
        return {"role": "assistant", "content": content, "reasoning_content": reasoning,
                "tool_calls": [{"type": "function", "function": c} for c in calls]}

    def _parse_tool_calls(self, text: str, pos: int) -> tuple[list[dict], int]:
        """DSML invokes from `pos` (just after <｜DSML｜BLOCK) to </｜DSML｜BLOCK>; returns the calls
        ({"name", "arguments"}) and the position after the block."""
        if not text.startswith(">\n", pos):
            raise DSMLError(f"malformed <{DSML}{self.block}> opening: {text[pos:pos + 40]!r}")
        pos += 2
        calls = []
        while not text.startswith(self.calls_end, pos):
            if not text.startswith(INVOKE, pos):
                raise DSMLError(f"expected {INVOKE} or {self.calls_end}, got {text[pos:pos + 60]!r}")
            pos += len(INVOKE)
            head_end = min((i for i in (text.find(PARAMETER, pos), text.find(INVOKE_CLOSE, pos)) if i >= 0), default=-1)
            name = INVOKE_NAME.fullmatch(text, pos, head_end) if head_end >= 0 else None
            if name is None:
                raise DSMLError(f"malformed {INVOKE} name=\"...\">: {text[pos:pos + 60]!r}")
            pos, name, args = head_end, name[1], {}
            while text.startswith(PARAMETER, pos):
                end = text.find(PARAMETER_END, pos)  # the value runs to the first one
                closed = end >= 0 and text.startswith(">\n", end + len(PARAMETER_END))
                param = PARAMETER_BODY.fullmatch(text, pos + len(PARAMETER), end) if closed else None
                if param is None:
                    raise DSMLError(f"malformed parameter in call {name!r}: {text[pos:pos + 60]!r}")
                key, is_string, value = param.groups()
                if key in args:
                    raise DSMLError(f"parameter {key!r} given twice in call {name!r}")
                args[key] = _json(value) if is_string == "true" else value
                pos = end + len(PARAMETER_END) + 2
            if not text.startswith(INVOKE_END, pos):
                raise DSMLError(f"call {name!r} is not closed by {INVOKE_CLOSE}>: {text[pos:pos + 60]!r}")
            pos += len(INVOKE_END)
            calls.append({"name": name, "arguments": "{" + ", ".join(f"{_json(k)}: {v}" for k, v in args.items()) + "}"})
        return calls, pos + len(self.calls_end)


# ---------------------------------------------------------------- conversation helpers


def attach_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Request `tools` (OpenAI format) on a leading system/developer message, replacing its own, or on
    a new empty system message in front (vLLM's convention; the references read tools only from
    messages). A new list; the caller's messages are not changed."""
    messages = list(messages)
    if tools:
        if messages and messages[0].get("role") in ("system", "developer"):
            messages[0] = {**messages[0], "tools": tools}
        else:
            messages.insert(0, {"role": "system", "tools": tools})
    return messages


def last_user_index(messages: list[dict]) -> int:
    return max((i for i, m in enumerate(messages) if m.get("role") in ("user", "developer")), default=-1)


def drop_past_reasoning(messages: list[dict], kept_roles: tuple[str, ...]) -> list[dict]:
    """Before the last user (or developer) message: assistants lose their reasoning, messages of
    `kept_roles` stay, any other (developer) message goes."""
    last_user = last_user_index(messages)
    kept = []
    for i, m in enumerate(messages):
        if i >= last_user or m.get("role") in kept_roles:
            kept.append(m)
        elif m.get("role") == "assistant":
            kept.append({k: v for k, v in m.items() if k != "reasoning_content"})
    return kept


def system_text(m: dict, dialect: Dialect) -> str:
    """A system message's content, then its tools and response format sections."""
    text = m.get("content") or ""
    if m.get("tools"):
        text += "\n\n" + dialect.render_tools(m["tools"])
    if m.get("response_format"):
        text += "\n\n" + RESPONSE_FORMAT + _json(m["response_format"])
    return text


def tool_result_text(content) -> str:
    """A tool message's content; a list of content blocks joins its text blocks by "\\n\\n"."""
    if isinstance(content, list):
        content = "\n\n".join(b.get("text", "") if b.get("type") == "text" else f"[Unsupported {b.get('type')}]"
                              for b in content)
    return f"{content}"


def split_reasoning(messages: list[dict]) -> list[dict]:
    """Assistant messages stored as raw replies ("reasoning</think>answer", as chat.py keeps them)
    split into `reasoning_content` and `content`; other messages as they are."""
    out = []
    for m in messages:
        if m.get("role") == "assistant" and "reasoning_content" not in m and THINK_END in (m.get("content") or ""):
            reasoning, _, content = m["content"].partition(THINK_END)
            m = {**m, "reasoning_content": reasoning.removeprefix(THINK_START), "content": content}
        out.append(m)
    return out
