"""DeepSeek-V4's prompt format: conversation -> prompt text, and a generated reply -> message.

V4 ships no Jinja chat template. Its format is defined by DeepSeek's `encoding/encoding_dsv4.py`
in the deepseek-ai/DeepSeek-V4-Flash Hugging Face repo (revision 60d8d70770c6776ff598c94bb586a859a38244f1,
sha256 bdbd57c132a1b3725042323d02b98b9d1df28e5f388f134399555d041f5055e0; the same file ships with
V4-Pro). This module is our own code written from that file's behaviour; tests/data/encoding_v4_cases.json
holds the reference's outputs on the conversations we test (where we read it: see that file's "source").

The prompt, message by message (after a BOS):
  system     content, then "\\n\\n" + the tools section if it carries tools, "\\n\\n" + a response format
  user       <｜User｜>text; tool results are merged into the user turn they precede as
             <tool_result>...</tool_result> (in the order of the calls), parts joined by "\\n\\n";
             consecutive user messages merge the same way
  assistant  [reasoning</think>]content["\\n\\n" + <｜DSML｜tool_calls> block]<｜end▁of▁sentence｜>
  A user turn that an assistant follows, or that ends the conversation, is closed by <｜Assistant｜>
  and then <think> (thinking mode: the model reasons first) or </think> (chat mode, or a past turn).
History (thinking mode): reasoning is kept only for assistant turns after the last user message;
earlier turns render as <｜Assistant｜></think>content. If any message defines tools, nothing is
dropped: every assistant turn keeps reasoning</think> and every user turn opens <think>.
Chat mode never renders reasoning.

Also as in the reference: `developer` (a user turn carrying tools), `latest_reminder`, a `task` on a
user message (DeepSeek's quick-instruction tokens), `wo_eos` on an assistant message (continue it),
`reasoning_effort="max"` (a preamble in thinking mode). Not carried over: the reference's `context=`
(incremental encoding of a suffix); render the whole conversation instead.
"""

from __future__ import annotations

import json
import re

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START, THINK_END = "<think>", "</think>"
DSML = "｜DSML｜"
TOOL_CALLS_OPEN = f"\n\n<{DSML}tool_calls"  # after an assistant's content; the block goes on with ">\n"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
TASK_TOKENS = {t: f"<｜{t}｜>" for t in ("action", "query", "authority", "domain", "title", "read_url")}

REASONING_EFFORT_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the "
    "root cause, rigorously stress-testing your logic against all potential paths, edge cases, and "
    "adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, "
    "considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

TOOLS_SECTION = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

{{schemas}}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

RESPONSE_FORMAT = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"


class DSMLError(ValueError):
    """A reply that does not follow the V4 format (thinking block, tool calls, end of sentence)."""


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------- rendering


def encode_messages(messages: list[dict], tools: list[dict] | None = None, thinking: bool = True,
                    drop_thinking: bool = True, reasoning_effort: str | None = None,
                    add_generation_prompt: bool = True, add_bos: bool = True) -> str:
    """The V4 prompt of OpenAI-style `messages` (roles system, user, assistant, tool; assistant
    messages may carry `reasoning_content` and `tool_calls`).

    `tools` (OpenAI format) are attached to a leading system/developer message, replacing its own,
    or to a new empty system message in front (vLLM's convention; the reference reads tools only
    from messages). `thinking` is the reference's thinking_mode "thinking" (True) or "chat".
    `add_generation_prompt=False` leaves off the trailing <｜Assistant｜><think> (or </think>)
    that the reference always writes after a final user turn.
    """
    if reasoning_effort not in (None, "high", "max"):
        raise ValueError(f"reasoning_effort must be None, 'high' or 'max', not {reasoning_effort!r}")
    messages = list(messages)
    if tools:
        if messages and messages[0].get("role") in ("system", "developer"):
            messages[0] = {**messages[0], "tools": tools}
        else:
            messages.insert(0, {"role": "system", "tools": tools})
    turns = _order_tool_results(_merge_tool_results(messages))
    keep_reasoning = not drop_thinking or any(m.get("tools") for m in turns)
    if thinking and not keep_reasoning:
        turns = _drop_past_reasoning(turns)
    last_user = max((i for i, m in enumerate(turns) if m.get("role") in ("user", "developer")), default=-1)

    prompt = BOS if add_bos else ""
    if thinking and reasoning_effort == "max" and turns:
        prompt += REASONING_EFFORT_MAX
    for i, m in enumerate(turns):
        prompt += _render(m, turns[i - 1] if i else None, i > last_user, thinking, keep_reasoning)
        following = turns[i + 1].get("role") if i + 1 < len(turns) else None
        if following not in (None, "assistant", "latest_reminder"):
            continue
        if following is None and not add_generation_prompt:
            break
        opens_thinking = thinking and (keep_reasoning or i >= last_user)
        if m.get("task") is not None:
            if m["task"] not in TASK_TOKENS:
                raise ValueError(f"unknown task {m['task']!r}; known: {sorted(TASK_TOKENS)}")
            if m["task"] == "action":
                prompt += ASSISTANT + (THINK_START if thinking else THINK_END)
            prompt += TASK_TOKENS[m["task"]]
        elif m.get("role") in ("user", "developer"):
            prompt += ASSISTANT + (THINK_START if opens_thinking else THINK_END)
    return prompt


def _render(m: dict, previous: dict | None, after_last_user: bool, thinking: bool, keep_reasoning: bool) -> str:
    role = m.get("role")
    if role in ("system", "developer"):
        if role == "developer" and not m.get("content"):
            raise ValueError("a developer message needs content")
        text = (USER if role == "developer" else "") + (m.get("content") or "")
        if m.get("tools"):
            text += "\n\n" + render_tools(m["tools"])
        if m.get("response_format"):
            text += "\n\n" + RESPONSE_FORMAT + _json(m["response_format"])
        return text
    if role == "user":
        return USER + "\n\n".join(_render_part(p) for p in m["parts"])
    if role == "latest_reminder":
        return LATEST_REMINDER + str(m.get("content"))
    if role == "assistant":
        reasoning = ""
        if thinking and (previous is None or previous.get("task") is None):
            if keep_reasoning or after_last_user:
                reasoning = (m.get("reasoning_content") or "") + THINK_END
        calls = m.get("tool_calls") or []
        block = (TOOL_CALLS_OPEN + ">\n" + "\n".join(map(render_tool_call, calls)) + "\n" + TOOL_CALLS_END) if calls else ""
        return reasoning + (m.get("content") or "") + block + ("" if m.get("wo_eos") else EOS)
    raise ValueError(f"unknown message role {role!r}")


def _render_part(part: tuple) -> str:
    kind, content = part
    if kind == "text":
        return content
    if isinstance(content, list):  # content blocks of a tool result
        content = "\n\n".join(b.get("text", "") if b.get("type") == "text" else f"[Unsupported {b.get('type')}]"
                              for b in content)
    return f"<tool_result>{content}</tool_result>"


def render_tools(tools: list[dict]) -> str:
    """The tools section of a system prompt; `tools` in OpenAI format ({"type": "function", "function": ...})."""
    return TOOLS_SECTION.replace("{schemas}", "\n".join(_json(t["function"]) for t in tools))


def render_tool_call(call: dict) -> str:
    """One OpenAI-format tool call as a DSML invoke. Arguments are a JSON object in a string (as
    OpenAI sends them) or already a dict; a string that is not JSON becomes one string parameter
    "arguments", as in the reference."""
    function = call["function"]
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            arguments = {"arguments": function["arguments"]}
    if not isinstance(arguments, dict):
        raise ValueError(f"tool call {function.get('name')!r}: arguments must be a JSON object, not {arguments!r}")
    params = [f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
              f'{v if isinstance(v, str) else _json(v)}</{DSML}parameter>' for k, v in arguments.items()]
    return f'<{DSML}invoke name="{function.get("name")}">\n' + "\n".join(params) + f"\n</{DSML}invoke>"


def _merge_tool_results(messages: list[dict]) -> list[dict]:
    """V4 has no tool role: tool results, and the user text after them, join one user turn as `parts`
    ((kind, content) pairs). Consecutive user messages join too, unless the first carries a task."""
    turns: list[dict] = []
    for m in messages:
        role = m.get("role")
        last = turns[-1] if turns and turns[-1]["role"] == "user" else None
        if role == "tool":
            part = ("tool_result", m.get("content", ""), m.get("tool_call_id", ""))
            if last is not None:
                last["parts"].append(part)
            else:
                turns.append({"role": "user", "parts": [part]})
        elif role == "user":
            content = m.get("content", "")
            if content is not None and not isinstance(content, str):
                raise ValueError("user message content must be a string")
            part = ("text", content or "")
            if last is not None and last.get("task") is None:
                last["parts"].append(part)
            else:
                turns.append({"role": "user", "parts": [part], **{k: m[k] for k in ("task", "wo_eos") if k in m}})
        else:
            turns.append(dict(m))
    return turns


def _order_tool_results(turns: list[dict]) -> list[dict]:
    """Tool results in a user turn, reordered (stably) to the order of the latest assistant's calls."""
    order: dict = {}
    for m in turns:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            ids = [c.get("id") or c.get("function", {}).get("id", "") for c in m["tool_calls"]]
            order = {tc_id: i for i, tc_id in enumerate(ids) if tc_id}
        elif m.get("role") == "user" and order:
            slots = [i for i, p in enumerate(m["parts"]) if p[0] == "tool_result"]
            if len(slots) > 1:
                ranked = sorted((m["parts"][i] for i in slots), key=lambda p: order.get(p[2], 0))
                for i, p in zip(slots, ranked):
                    m["parts"][i] = p
    for m in turns:
        if m.get("role") == "user":
            m["parts"] = [p[:2] for p in m["parts"]]
    return turns


def _drop_past_reasoning(turns: list[dict]) -> list[dict]:
    """Before the last user turn: assistants lose their reasoning, developer (and other) turns go."""
    last_user = max((i for i, m in enumerate(turns) if m.get("role") in ("user", "developer")), default=-1)
    kept = []
    for i, m in enumerate(turns):
        if i >= last_user or m.get("role") in ("user", "system", "latest_reminder", "direct_search_results"):
            kept.append(m)
        elif m.get("role") == "assistant":
            kept.append({k: v for k, v in m.items() if k != "reasoning_content"})
    return kept


# ---------------------------------------------------------------- parsing


def parse_reply(text: str, thinking: bool = True, strict: bool = False) -> dict:
    """A generated assistant turn -> {"role", "content", "reasoning_content", "tool_calls"}.

    `text` is what the model wrote after the prompt (after <think> in thinking mode), with or without
    the final <｜end▁of▁sentence｜>. Tool calls come back in OpenAI format with `arguments` a JSON string,
    as the reference returns them (no ids). A reply that breaks the format raises DSMLError when
    `strict`; otherwise it comes back as plain text: reasoning up to the first </think> (all of it if
    the reply never closed its reasoning), the rest as content, no tool calls.
    """
    try:
        return _parse(text, thinking)
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


def _parse(text: str, thinking: bool) -> dict:
    reasoning, pos = "", 0
    if thinking:
        end = text.find(THINK_END)
        call = text.find(TOOL_CALLS_OPEN)
        if end < 0 or 0 <= call < end:
            raise DSMLError("the reasoning is not closed by </think>")
        reasoning, pos = text[:end], end + len(THINK_END)
    eos, call = text.find(EOS, pos), text.find(TOOL_CALLS_OPEN, pos)
    calls = []
    if call >= 0 and (eos < 0 or call < eos):
        content = text[pos:call]
        calls, pos = _parse_tool_calls(text, call + len(TOOL_CALLS_OPEN))
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


INVOKE, INVOKE_CLOSE, PARAMETER, PARAMETER_END = (f"<{DSML}invoke", f"</{DSML}invoke", f"<{DSML}parameter",
                                                   f"/{DSML}parameter")
INVOKE_END = INVOKE_CLOSE + ">\n"
INVOKE_NAME = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)  # "\n\n": a call without parameters
PARAMETER_BODY = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<\n?', re.DOTALL)


def _parse_tool_calls(text: str, pos: int) -> tuple[list[dict], int]:
    """DSML invokes from `pos` (just after <｜DSML｜tool_calls>) to </｜DSML｜tool_calls>; returns the calls
    ({"name", "arguments"}) and the position after the block."""
    if not text.startswith(">\n", pos):
        raise DSMLError(f"malformed <{DSML}tool_calls> opening: {text[pos:pos + 40]!r}")
    pos += 2
    calls = []
    while not text.startswith(TOOL_CALLS_END, pos):
        if not text.startswith(INVOKE, pos):
            raise DSMLError(f"expected {INVOKE} or {TOOL_CALLS_END}, got {text[pos:pos + 60]!r}")
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
    return calls, pos + len(TOOL_CALLS_END)


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
