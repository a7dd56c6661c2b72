"""A conversation rendered with the model's own chat template, as token ids.

Shared by chat.py and the server. DeepSeek's templates take OpenAI-shaped messages (tool calls
with JSON-string arguments, `tool` results); a base model without a template gets a plain
transcript; DeepSeek-V3.2 and -V4 (`model_type="deepseek_v32"`, `"deepseek_v4"`) ship no template
and are rendered by `encoding_v32` / `encoding_v4` (thinking mode by default; `thinking=False`:
their chat mode). `opens_think` says whether the rendered prompt ends inside a `<think>` (R1
always, V3.1 with `thinking=True`, V3.2 and V4 in thinking mode), so the reply starts in its reasoning.
"""

from __future__ import annotations

from importlib import import_module
from typing import Optional

THINK_START, THINK_END = "<think>", "</think>"
ENCODERS = {"deepseek_v32": ".encoding_v32", "deepseek_v4": ".encoding_v4"}  # model types without a template


def render(tokenizer, messages: list[dict], tools: Optional[list] = None, model_type: Optional[str] = None,
           **template_kwargs) -> tuple[list[int], bool]:
    if model_type in ENCODERS:  # no Jinja template: DeepSeek's own encoding for the version
        encoding = import_module(ENCODERS[model_type], __package__)
        text = encoding.encode_messages(encoding.split_reasoning(messages), tools=tools,
                                        thinking=template_kwargs.get("thinking", True))
    elif getattr(tokenizer, "chat_template", None):
        extra = {"tools": tools} if tools else {}
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             **extra, **template_kwargs)
    else:  # a base model: a plain transcript
        text = "".join(f"{m['role'].capitalize()}: {m.get('content') or ''}\n\n" for m in messages) + "Assistant:"
    return tokenizer.encode(text, add_special_tokens=False), text.rstrip().endswith(THINK_START)
