"""`tool_choice` enforced while sampling: "required" or a named function makes the reply open a call.

Each DeepSeek family writes calls in its own format; the opening of a call (and, for a named
function, its header up to the arguments) is forced token by token once the reasoning is over, at
once when the reply does not think. Until then the reply cannot end. What follows (the arguments)
is the model's own, parsed as any other call. "none" leaves the tools out of the prompt; "auto"
changes nothing.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

V31_MARK = "tool['function']['name'] + '<｜tool▁sep｜>'"  # what V3.1's template writes for a call


def call_format(model_type: Optional[str], template: str) -> str:
    """"v3" (V3, R1: a json fence), "v3.1" (NAME<｜tool▁sep｜>{args}), "v3.2" or "v4" (DSML)."""
    if model_type == "deepseek_v4":
        return "v4"
    if model_type == "deepseek_v32" or "｜DSML｜" in template:
        return "v3.2"
    return "v3.1" if V31_MARK in template else "v3"


def call_opening(fmt: str, name: Optional[str]) -> str:
    """The text a call starts with; with `name`, up to where that function's arguments begin."""
    if fmt in ("v4", "v3.2"):
        block = "tool_calls" if fmt == "v4" else "function_calls"
        return f"\n\n<｜DSML｜{block}>\n" + (f'<｜DSML｜invoke name="{name}">\n' if name else "")
    if fmt == "v3.1":
        return "<｜tool▁calls▁begin｜>" + (f"<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>" if name else "")
    return "<｜tool▁calls▁begin｜>" + (f"<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n" if name else "")


def chosen_name(choice, tools: list) -> Optional[str]:
    """The function a `tool_choice` object names, checked against `tools` (ValueError otherwise)."""
    if not isinstance(choice, dict):
        return None
    name = (choice.get("function") or {}).get("name")
    if not isinstance(name, str):
        raise ValueError("tool_choice must be \"none\", \"auto\", \"required\" or "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if name not in [t["function"].get("name") for t in tools]:
        raise ValueError(f"tool_choice names '{name}', which is not one of the request's tools")
    return name


class ForcedOpening:
    """A logits processor (mlx-lm's signature: (history, logits) -> logits) for one request."""

    def __init__(self, opening: list[int], prompt_tokens: int, think_end: Optional[list[int]], eos: set[int]):
        self.opening, self.prompt_tokens = opening, prompt_tokens
        self.think_end = think_end  # None: the reply does not start in a <think>
        self.eos = sorted(eos)

    def _start(self, generated: list[int]) -> Optional[int]:
        """Where the forced opening begins in the reply (None: still reasoning)."""
        if self.think_end is None:
            return 0
        n = len(self.think_end)
        for i in range(len(generated) - n + 1):
            if generated[i : i + n] == self.think_end:
                return i + n
        return None

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        generated = history.tolist()[self.prompt_tokens:]
        start = self._start(generated)
        if start is None:  # reasoning: it may go on, not end
            banned = mx.zeros(logits.shape[-1], dtype=mx.bool_)
            banned[mx.array(self.eos)] = True
            return mx.where(banned, mx.array(-mx.inf, logits.dtype), logits)
        k = len(generated) - start
        if k >= len(self.opening):
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == self.opening[k], logits, mx.array(-mx.inf, logits.dtype))
