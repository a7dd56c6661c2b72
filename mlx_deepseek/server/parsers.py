"""Splitting a streamed DeepSeek reply into reasoning, content and tool calls.

Text arrives piece by piece (a piece may end in the middle of a marker); each parser returns what
can be released now and holds back any tail that may be the start of a marker.

- Reasoning: `<think>` ... `</think>` (R1, V3.1 thinking, V3.2, V4). The template may open the
  `<think>` itself (R1 always does): then the reply starts inside the reasoning.
- Tool calls, three formats, told apart by what follows the markers:
  V3 / R1   `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\n{ARGS}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`
  V3.1      `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{ARGS}<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`
  DSML      `<｜DSML｜function_calls>` (V3.2; V4 names the block `tool_calls`), then per call
            `<｜DSML｜invoke name="NAME">`, `<｜DSML｜parameter name="K" string="true|false">V</｜DSML｜parameter>`
            (string="true": V is the raw string; "false": V is JSON), `</｜DSML｜invoke>`.
  Arguments are streamed as they grow (for DSML, one JSON member per finished parameter). A
  malformed call never raises: whatever cannot be read as a call is given back as plain content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Optional

THINK_START, THINK_END = "<think>", "</think>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
DSML = "｜DSML｜"
DSML_BEGINS = (f"<{DSML}function_calls>", f"<{DSML}tool_calls>")


def held_tail(text: str, markers) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`."""
    return max((k for m in markers for k in range(1, len(m)) if text.endswith(m[:k])), default=0)


class ReasoningParser:
    """feed(text) -> [("reasoning" | "content", text), ...]."""

    def __init__(self, thinking: bool = False):
        self.thinking, self.held, self.started = thinking, "", False

    def feed(self, text: str) -> list[tuple[str, str]]:
        text, self.held = self.held + text, ""
        out = []
        while text:
            tag = THINK_END if self.thinking else THINK_START
            at = text.find(tag)
            if at >= 0:
                out.append(("reasoning" if self.thinking else "content", text[:at]))
                self.thinking = not self.thinking
                text = text[at + len(tag):]
                if not self.thinking:
                    text = text.lstrip("\n")
                    self.started = not text  # strip the newlines after </think> in the next piece too
                continue
            if self.started and not self.thinking:
                text = text.lstrip("\n")
                self.started = not text
            keep = held_tail(text, [tag])
            out.append(("reasoning" if self.thinking else "content", text[: len(text) - keep]))
            self.held = text[len(text) - keep:]
            break
        return [(k, t) for k, t in out if t]

    def flush(self) -> list[tuple[str, str]]:
        text, self.held = self.held, ""
        return [("reasoning" if self.thinking else "content", text)] if text else []


@dataclass
class ToolCall:
    name: str
    arguments: str = ""
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])


@dataclass
class CallProgress:
    """One call read so far from the tool section."""
    name: Optional[str]
    arguments: str
    done: bool


def _read_json_call(body: str, final: bool) -> CallProgress:
    """V3/R1 or V3.1 call body (after <｜tool▁call▁begin｜>, before <｜tool▁call▁end｜>)."""
    if SEP not in body:
        return CallProgress(None, "", False)
    head, rest = body.split(SEP, 1)
    if head == "function":  # V3 / R1: the name on its own line, then a json fence
        if "\n" not in rest:
            return CallProgress(None, "", False)
        name, rest = rest.split("\n", 1)
        fence = "```json\n"
        if not rest.startswith(fence):
            if final or not fence.startswith(rest):
                raise ValueError(f"tool call {name!r}: expected a ```json fence")
            return CallProgress(None, "", False)  # announced once its fence is there
        args = rest[len(fence):]
        if final:
            if not args.rstrip().endswith("```"):
                raise ValueError(f"tool call {name!r}: the json fence is not closed")
            return CallProgress(name.strip(), args.rstrip()[:-3].rstrip("\n"), True)
        cut = args.find("\n```")
        if cut >= 0:
            return CallProgress(name.strip(), args[:cut], False)
        return CallProgress(name.strip(), args[: len(args) - held_tail(args, ["\n```"])], False)
    return CallProgress(head.strip(), rest, final)  # V3.1: NAME<｜tool▁sep｜>ARGS


class ToolCallParser:
    """feed(text) -> events: ("content", text), ("call", index, ToolCall) when a name is known,
    ("arguments", index, delta). Call `flush()` at the end of the reply."""

    def __init__(self):
        self.held = ""          # text not yet released (in content mode: a possible marker start)
        self.section: Optional[str] = None  # "json" or "dsml" once a tool section has begun
        self.calls: list[ToolCall] = []
        self.error: Optional[str] = None
        self.trailing = ""      # text after the end of the tool section
        self.closed = (0, 0)    # (calls, characters of the section) read up to the last closed call

    # -- streaming ---------------------------------------------------------------------------
    def feed(self, text: str) -> list[tuple]:
        if self.section is None:
            text, self.held = self.held + text, ""
            starts = [(text.find(m), m) for m in (CALLS_BEGIN, *DSML_BEGINS) if m in text]
            if not starts:
                keep = held_tail(text, (CALLS_BEGIN, *DSML_BEGINS))
                self.held = text[len(text) - keep:]
                return [("content", text[: len(text) - keep])] if text[: len(text) - keep] else []
            at, marker = min(starts)
            self.section, self.marker = ("json" if marker == CALLS_BEGIN else "dsml"), marker
            out = [("content", text[:at])] if at else []
            self.held = text[at + len(marker):]
            return out + self._progress(final=False)
        self.held += text
        return self._progress(final=False)

    def flush(self) -> list[tuple]:
        if self.section is None:
            text, self.held = self.held, ""
            return [("content", text)] if text else []
        return self._progress(final=True)

    # -- the tool section, re-read as it grows -----------------------------------------------
    def _progress(self, final: bool) -> list[tuple]:
        if self.error:
            return []
        reads: list[CallProgress] = []
        try:
            (self._read_json if self.section == "json" else self._read_dsml)(final, reads)
            broken = None
        except ValueError as e:
            broken = str(e)  # decided at the end: more text may still make it readable
        out = self._announce(reads)
        if broken and final:
            self.error = broken
            return out + self._give_back()
        if final and self.trailing.strip():
            out.append(("content", self.trailing))
        return out

    def _announce(self, reads: list[CallProgress]) -> list[tuple]:
        out = []
        for i, r in enumerate(reads):
            if r.name is None:
                break
            if i == len(self.calls):
                self.calls.append(ToolCall(r.name))
                out.append(("call", i, self.calls[i]))
            call = self.calls[i]
            if r.arguments.startswith(call.arguments) and len(r.arguments) > len(call.arguments):
                out.append(("arguments", i, r.arguments[len(call.arguments):]))
                call.arguments = r.arguments
        return out

    def _give_back(self) -> list[tuple]:
        """An unreadable section: the calls closed before it stay (a streaming client may already
        have seen the start of the broken one); the raw text from there on becomes content."""
        n, at = self.closed
        del self.calls[n:]
        marker = CALLS_BEGIN if self.section == "json" else self.marker
        text = self.held[at:] if n else marker + self.held
        return [("content", text)] if text else []

    def _read_json(self, final: bool, reads: list[CallProgress]) -> None:
        body = self.held
        end = body.find(CALLS_END)
        if end >= 0:
            body, self.trailing, final = body[:end], body[end + len(CALLS_END):], True
        for n, part in enumerate(body.split(CALL_BEGIN)):
            if n == 0:
                if part.strip():
                    raise ValueError(f"unexpected text in the tool section: {part[:40]!r}")
                continue
            closed = CALL_END in part
            call_body, _, after = part.partition(CALL_END)
            if closed and after.strip():
                raise ValueError(f"unexpected text between tool calls: {after[:40]!r}")
            if not closed:
                call_body = call_body[: len(call_body) - held_tail(call_body, [CALL_END])] if not final else call_body
            if final and not closed:
                raise ValueError("a tool call is not closed")
            reads.append(_read_json_call(call_body, final=closed or final))
            if closed:
                upto = sum(len(x) + len(CALL_BEGIN) for x in body.split(CALL_BEGIN)[: n + 1]) - len(CALL_BEGIN)
                self.closed = (len(reads), upto - len(after))
        if final and not reads:
            raise ValueError("an empty tool section")

    def _read_dsml(self, final: bool, reads: list[CallProgress]) -> None:
        body = self.held
        for end_marker in (f"</{DSML}function_calls>", f"</{DSML}tool_calls>"):
            end = body.find(end_marker)
            if end >= 0:
                body, self.trailing, final = body[:end], body[end + len(end_marker):], True
                break
        else:
            if final:
                raise ValueError("the DSML tool section is not closed")
        invokes = body.split(f"<{DSML}invoke")
        if invokes[0].strip():
            raise ValueError(f"unexpected text in the tool section: {invokes[0][:40]!r}")
        for inv in invokes[1:]:
            m = re.match(r'\s*name="([^"]*)">', inv)
            if not m:
                if final or not re.fullmatch(r'\s*(n(a(m(e(="[^"]*"?)?)?)?)?)?', inv):
                    raise ValueError(f"a DSML invoke without a name: {inv[:40]!r}")
                break
            closed = f"</{DSML}invoke>" in inv
            members = []
            params = inv[m.end():].split(f"</{DSML}invoke>")[0]
            for p in re.finditer(rf'<{DSML}parameter name="([^"]*)" string="(true|false)">(.*?)</{DSML}parameter>',
                                 params, flags=re.DOTALL):
                key, is_str, value = p.groups()
                if is_str == "false":
                    try:
                        json.loads(value)
                    except ValueError:
                        raise ValueError(f"parameter {key!r} of {m.group(1)!r} is not JSON: {value[:40]!r}") from None
                    members.append(f"{json.dumps(key)}: {value.strip()}")
                else:
                    members.append(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}")
            if final and not closed:
                raise ValueError(f"the DSML invoke of {m.group(1)!r} is not closed")
            if closed:
                start = sum(len(x) for x in invokes[: len(reads) + 1]) + len(f"<{DSML}invoke") * (len(reads) + 1)
                self.closed = (len(reads) + 1, start + inv.index(f"</{DSML}invoke>") + len(f"</{DSML}invoke>"))
            args = "{" + ", ".join(members) + ("}" if closed else "")
            reads.append(CallProgress(m.group(1), args if (members or closed) else "", closed))
        if final and not reads:
            raise ValueError("an empty tool section")


class ReplyParser:
    """Reasoning first, then tool calls inside the content: feed(text) -> events as ToolCallParser's
    plus ("reasoning", text)."""

    def __init__(self, thinking: bool = False, tools: bool = True):
        self.reasoning = ReasoningParser(thinking)
        self.tools = ToolCallParser() if tools else None

    def _route(self, pieces) -> list[tuple]:
        out = []
        for kind, text in pieces:
            if kind == "reasoning" or self.tools is None:
                out.append((kind, text))
            else:
                out.extend(self.tools.feed(text))
        return out

    def feed(self, text: str) -> list[tuple]:
        return self._route(self.reasoning.feed(text))

    def flush(self) -> list[tuple]:
        out = self._route(self.reasoning.flush())
        return out + (self.tools.flush() if self.tools else [])

    @property
    def calls(self) -> list[ToolCall]:
        return self.tools.calls if self.tools else []


def parse_reply(text: str, thinking: bool = False, tools: bool = True) -> dict:
    """The whole reply at once: {"reasoning": str, "content": str, "tool_calls": [ToolCall]}."""
    p = ReplyParser(thinking, tools)
    out = {"reasoning": "", "content": "", "tool_calls": p.calls}
    for event in p.feed(text) + p.flush():
        if event[0] in ("reasoning", "content"):
            out[event[0]] += event[1]
    return out
