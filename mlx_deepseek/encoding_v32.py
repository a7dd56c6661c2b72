"""DeepSeek-V3.2's prompt format: conversation -> prompt text, and a generated reply -> message.

V3.2 (`model_type: deepseek_v32`) ships no Jinja chat template. Its format is defined by DeepSeek's
`encoding/encoding_dsv32.py` in the deepseek-ai/DeepSeek-V3.2 Hugging Face repo. This module is
our own code written from that file's behaviour; tests/data/encoding_v32_cases.json holds the
reference's outputs on the conversations we test (which copy we ran: see that file's "source").

The prompt, message by message (after a BOS):
  system     content, then "\\n\\n" + the tools section if it carries tools, "\\n\\n" + a response format
  user       <｜User｜>text<｜Assistant｜>, then <think> if it is the last user message in thinking
             mode, else </think> (every user message is closed so; consecutive ones do not merge)
  developer  as a user message whose text is its tools and response format sections, then
             "\\n\\n# The user's message is: " + content
  assistant  [reasoning</think>]content["\\n\\n" + <｜DSML｜function_calls> block]<｜end▁of▁sentence｜>,
             the reasoning part only after the last user message in thinking mode
  tool       the results of an assistant's calls, in message order after it (not matched by id):
             "\\n\\n<function_results>", "\\n<result>R</result>" each, "\\n</function_results>" after
             the last of its calls, then "\\n\\n" + <think> (after the last user message, thinking
             mode: the model reasons about the results) or </think>
Unlike V4: tools never keep past reasoning (an assistant before the last user message renders as
</think>content whatever `drop_thinking` says; it only decides whether developer messages before
the last user message stay), no `reasoning_effort`, `task`, `latest_reminder` or `wo_eos`.

Where we differ from the reference on purpose (inputs it mishandles, not in the test cases):
an assistant after the last user message without reasoning or calls renders (the reference
asserts); a dict `arguments` is taken as the object (the reference needs a JSON string); a user
message's `content` None is empty (the reference writes "None"); a list of content blocks in a
tool result joins its text blocks (the reference writes the list's Python repr); a developer
message dropped from the history no longer shifts the messages (the reference then fails).
"""

from __future__ import annotations

from .encoding_dsml import (ASSISTANT, BOS, DSML, EOS, THINK_END, THINK_START, USER, Dialect,  # noqa: F401
                            DSMLError, attach_tools, drop_past_reasoning, last_user_index, split_reasoning,
                            system_text, tool_result_text)

TOOLS_SECTION = f"""## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{DSML}function_calls>" block like the following as part of your reply to the user:
<{DSML}function_calls>
<{DSML}invoke name="$FUNCTION_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$FUNCTION_NAME2">
...
</{DSML}invoke>
</{DSML}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

<{DSML}function_calls>
...
</{DSML}function_calls>

<function_results>
...
</function_results>

{THINK_START}...thinking about results{THINK_END}

Here are the functions available in JSONSchema format:
<functions>
{{schemas}}
</functions>
"""

V32 = Dialect(block="function_calls", tools_section=TOOLS_SECTION, wrap_non_json=False)
FUNCTION_CALLS_OPEN, FUNCTION_CALLS_END = V32.calls_open, V32.calls_end
render_tools, render_tool_call, parse_reply = V32.render_tools, V32.render_tool_call, V32.parse_reply
DEVELOPER_USER_MESSAGE = "\n\n# The user's message is: "


def encode_messages(messages: list[dict], tools: list[dict] | None = None, thinking: bool = True,
                    drop_thinking: bool = True, add_bos: bool = True) -> str:
    """The V3.2 prompt of OpenAI-style `messages` (roles system, developer, user, assistant, tool;
    assistant messages may carry `reasoning_content` and `tool_calls`).

    `tools` (OpenAI format) are attached to a leading system/developer message, replacing its own,
    or to a new empty system message in front (vLLM's convention; the reference reads tools only
    from messages). `thinking` is the reference's thinking_mode "thinking" (True) or "chat". A
    conversation that ends with a user message or a round of tool results ends with the
    generation prompt (<｜Assistant｜><think>, "\\n\\n<think>", or </think> in chat mode).
    """
    messages = attach_tools(messages, tools)
    if thinking and drop_thinking:
        messages = drop_past_reasoning(messages, ("user", "system", "tool"))
    last_user = last_user_index(messages)
    prompt = BOS if add_bos else ""
    for i, m in enumerate(messages):
        prompt += _render(messages, i, last_user, thinking)
    return prompt


def _render(messages: list[dict], i: int, last_user: int, thinking: bool) -> str:
    m = messages[i]
    role = m.get("role")
    opener = THINK_START if thinking and i == last_user else THINK_END
    if role == "system":
        return system_text(m, V32)
    if role == "developer":
        if not m.get("content"):
            raise ValueError("a developer message needs content")
        text = system_text({**m, "content": ""}, V32) + DEVELOPER_USER_MESSAGE + m["content"]
        return USER + text + ASSISTANT + opener
    if role == "user":
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError("user message content must be a string")
        return USER + (content or "") + ASSISTANT + opener
    if role == "tool":
        return _render_tool_result(messages, i, last_user, thinking)
    if role == "assistant":
        reasoning = (m.get("reasoning_content") or "") + THINK_END if thinking and i > last_user else ""
        return reasoning + (m.get("content") or "") + V32.render_tool_calls(m.get("tool_calls") or []) + EOS
    raise ValueError(f"unknown message role {role!r}")


def _render_tool_result(messages: list[dict], i: int, last_user: int, thinking: bool) -> str:
    """The k-th tool message after an assistant answers that assistant's k-th call."""
    caller = i - 1
    while caller >= 0 and messages[caller].get("role") == "tool":
        caller -= 1
    caller_is_assistant = caller >= 0 and messages[caller].get("role") == "assistant"
    calls = (messages[caller].get("tool_calls") or []) if caller_is_assistant else []
    k = i - caller
    if k > len(calls):
        raise ValueError(f"message {i}: a tool result without a matching call (the assistant before it made "
                         f"{len(calls)} call{'s' * (len(calls) != 1)})")
    result = tool_result_text(messages[i].get("content", ""))
    text = ("\n\n<function_results>" if k == 1 else "") + f"\n<result>{result}</result>"
    if k == len(calls):
        text += "\n</function_results>\n\n" + (THINK_START if thinking and i >= last_user else THINK_END)
    return text
