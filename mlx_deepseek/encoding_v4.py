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

The DSML calls (rendered and parsed), the tools section's layout and the reasoning-drop rule are
shared with DeepSeek-V3.2's format in encoding_dsml.py; `V4` is this format's dialect of it.
"""

from __future__ import annotations

from .encoding_dsml import (ASSISTANT, BOS, DSML, EOS, RESPONSE_FORMAT, THINK_END, THINK_START, USER,  # noqa: F401
                            Dialect, DSMLError, attach_tools, drop_past_reasoning, last_user_index,
                            split_reasoning, system_text, tool_result_text)

LATEST_REMINDER = "<｜latest_reminder｜>"
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

V4 = Dialect(block="tool_calls", tools_section=TOOLS_SECTION, wrap_non_json=True)
TOOL_CALLS_OPEN, TOOL_CALLS_END = V4.calls_open, V4.calls_end
render_tools, render_tool_call, parse_reply = V4.render_tools, V4.render_tool_call, V4.parse_reply


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
    turns = _order_tool_results(_merge_tool_results(attach_tools(messages, tools)))
    keep_reasoning = not drop_thinking or any(m.get("tools") for m in turns)
    if thinking and not keep_reasoning:
        turns = drop_past_reasoning(turns, ("user", "system", "latest_reminder", "direct_search_results"))
    last_user = last_user_index(turns)

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
        return (USER if role == "developer" else "") + system_text(m, V4)
    if role == "user":
        return USER + "\n\n".join(_render_part(p) for p in m["parts"])
    if role == "latest_reminder":
        return LATEST_REMINDER + str(m.get("content"))
    if role == "assistant":
        reasoning = ""
        if thinking and (previous is None or previous.get("task") is None):
            if keep_reasoning or after_last_user:
                reasoning = (m.get("reasoning_content") or "") + THINK_END
        block = V4.render_tool_calls(m.get("tool_calls") or [])
        return reasoning + (m.get("content") or "") + block + ("" if m.get("wo_eos") else EOS)
    raise ValueError(f"unknown message role {role!r}")


def _render_part(part: tuple) -> str:
    kind, content = part
    return content if kind == "text" else f"<tool_result>{tool_result_text(content)}</tool_result>"


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
