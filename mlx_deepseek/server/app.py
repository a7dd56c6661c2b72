"""HTTP: OpenAI-compatible routes, SSE streaming, auth, CORS, body limits, the web page.

Nothing here touches MLX: requests are validated and tokenized, handed to the `Scheduler` (the
generation thread), and its events are turned into OpenAI responses or SSE chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..chat_template import ENCODERS, THINK_END, render
from .parsers import ReplyParser
from .tool_choice import ForcedOpening, call_format, call_opening, chosen_name
from .scheduler import Finish, Piece, Request

PAGE = Path(__file__).with_name("page") / "index.html"


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: Optional[str] = None,
                 param: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


# -- request fields ------------------------------------------------------------------------------
NUMBER, INT, STR, BOOL, LIST, DICT = (int, float), int, str, bool, list, dict
FIELDS = {
    "model": STR, "messages": LIST, "prompt": (str, list), "max_tokens": INT, "max_completion_tokens": INT,
    "temperature": NUMBER, "top_p": NUMBER, "top_k": INT, "min_p": NUMBER, "seed": INT, "stop": (str, list),
    "n": INT, "logprobs": (bool, int), "top_logprobs": INT, "stream": BOOL, "stream_options": DICT,
    "tools": LIST, "tool_choice": (str, dict), "chat_template_kwargs": DICT, "reasoning_effort": STR,
    "repetition_penalty": NUMBER, "echo": BOOL,
}


KIND_NAMES = {NUMBER: "a number", INT: "an integer", STR: "a string", BOOL: "a boolean", LIST: "an array",
              DICT: "an object", (str, list): "a string or an array", (str, dict): "a string or an object",
              (bool, int): "a boolean or an integer"}


def field(body: dict, name: str, default=None):
    value = body.get(name)
    if value is None:
        return default
    kind = FIELDS[name]
    wrong = not isinstance(value, kind) or (isinstance(value, bool) and kind in (INT, NUMBER) and name != "logprobs")
    if wrong:
        raise APIError(400, f"'{name}' must be {KIND_NAMES[kind]}, got {json.dumps(value)[:60]}", param=name,
                       code="invalid_type")
    return value


class Server:
    """What the routes share: the model once loaded, the scheduler, the settings."""

    def __init__(self, settings):
        self.settings = settings
        self.model_id = settings.served_model_name
        self.tokenizer = None
        self.model_type = None
        self.scheduler = None
        self.context = None
        self.sampling = {"temp": 0.6, "top_p": 0.95}
        self.load_error: Optional[str] = None
        self.vocab = None
        self.expert_stats = None  # with --expert-memory: the streamed experts' counters (ExpertStats)

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    # -- checks --------------------------------------------------------------------------------
    def check_model(self, body: dict) -> None:
        name = field(body, "model")
        if name and name not in (self.model_id, self.settings.model, "default"):
            raise APIError(404, f"The model '{name}' is not served here; this server serves '{self.model_id}' "
                                f"(it serves only the model it was started with)", code="model_not_found",
                           param="model")

    def request(self, body: dict, prompt: list[int], emit) -> Request:
        if field(body, "n", 1) != 1:
            raise APIError(400, "only n = 1 is supported", param="n")
        asked = field(body, "max_completion_tokens", field(body, "max_tokens"))
        if asked is not None and asked < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {asked}", param="max_tokens")
        room = self.context - len(prompt)
        if room < 1:
            raise APIError(400, f"The prompt is {len(prompt)} tokens; the model's context is {self.context} tokens",
                           code="context_length_exceeded", param="messages")
        max_tokens = min(asked or self.settings.max_tokens, room)
        stop = field(body, "stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) for s in stop) or len(stop) > 4:
            raise APIError(400, "'stop' must be a string or up to 4 strings", param="stop")
        logprobs = field(body, "logprobs", False)
        top = field(body, "top_logprobs", 0)
        if not 0 <= top <= 20:
            raise APIError(400, "top_logprobs must be between 0 and 20", param="top_logprobs")
        if isinstance(logprobs, int) and not isinstance(logprobs, bool):  # /v1/completions: an integer
            logprobs, top = True, min(max(logprobs, 0), 20)
        if self.settings.mtp and (logprobs or field(body, "repetition_penalty")):
            raise APIError(400, "with --mtp the server samples exactly from the model's distribution by speculative "
                                "decoding: logprobs and repetition_penalty are not available", param="logprobs")
        temp = field(body, "temperature", self.sampling["temp"])
        top_p = field(body, "top_p", self.sampling["top_p"])
        if temp < 0 or not 0 <= top_p <= 1:
            raise APIError(400, "temperature must be >= 0 and top_p within [0, 1]", param="temperature")
        return Request(
            prompt=prompt, max_tokens=max_tokens, emit=emit, temp=float(temp), top_p=float(top_p) if temp else 0.0,
            min_p=float(field(body, "min_p", self.settings.min_p)), top_k=field(body, "top_k", self.settings.top_k),
            repetition_penalty=field(body, "repetition_penalty"), seed=field(body, "seed"), stop=stop,
            logprobs=top if logprobs else None)

    # -- chat prompts --------------------------------------------------------------------------
    def chat_prompt(self, body: dict) -> tuple[list[int], bool, bool, Optional[str]]:
        """Token ids of the conversation; whether the reply starts in a <think>; whether tools are on;
        the text a call must open with (tool_choice "required" or a named function), else None."""
        messages = field(body, "messages")
        if not messages:
            raise APIError(400, "'messages' must be a non-empty array", param="messages")
        messages = [normalize_message(m, i, self.model_type in ENCODERS) for i, m in enumerate(messages)]
        tools = field(body, "tools")
        choice = field(body, "tool_choice", "auto")
        if tools is not None and not all(isinstance(t, dict) and isinstance(t.get("function"), dict) for t in tools):
            raise APIError(400, "each tool must be {\"type\": \"function\", \"function\": {...}}", param="tools")
        if choice == "none":
            tools = None
        if choice not in ("none", "auto", "required") and not isinstance(choice, dict):
            raise APIError(400, "tool_choice must be \"none\", \"auto\", \"required\" or a function", param="tool_choice")
        try:
            name = chosen_name(choice, tools or [])
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice") from None
        kwargs = dict(field(body, "chat_template_kwargs", {}))
        effort = field(body, "reasoning_effort")
        thinking = kwargs.get("thinking", kwargs.get("enable_thinking"))
        if effort is not None:
            thinking = effort != "none"
        if thinking is not None:
            kwargs["thinking"] = bool(thinking)
        template = getattr(self.tokenizer, "chat_template", None) or ""
        opening = None
        if tools and (choice == "required" or name):
            if self.settings.mtp:
                raise APIError(400, "with --mtp, tool_choice \"required\" or a named function is not enforced "
                                    "(speculative steps take no logits processors): use \"auto\"", param="tool_choice")
            opening = call_opening(call_format(self.model_type, template), name)
        if tools and self.model_type not in ENCODERS and "tools" not in template:  # tell the model
            messages = [{"role": "system", "content": describe_tools(tools, template, choice)}] + messages
        try:
            tokens, opens_think = render(self.tokenizer, messages, tools, self.model_type, **kwargs)
        except Exception as e:  # a template that refuses the conversation (jinja raise_exception)
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        if thinking is False and opens_think:  # a template that always thinks (R1): close it at once
            tokens += self.tokenizer.encode("\n" + THINK_END + "\n\n", add_special_tokens=False)
            opens_think = False
        return tokens, opens_think, bool(tools), opening

    def warm(self, body: dict, message: dict) -> None:
        """Queue a warm-up of the conversation as it comes back next turn: its messages and this
        reply, rendered by the template up to the end of the reply. Templates re-render a reply
        differently from what was generated (R1 drops the reasoning of a plain reply; tool
        arguments come back re-serialized), so the generated tokens alone would be cached only up
        to the first difference; with the warm-up the returning conversation finds all of its
        history cached and prefills only its new message. Submitted before the reply is sent, so
        the next request is admitted after it."""
        if not getattr(self.settings, "warm_history", True):
            return
        history = list(field(body, "messages")) + [message]

        def rendered(then: str) -> list[int]:
            return self.chat_prompt({**body, "messages": history + [{"role": "user", "content": then}]})[0]

        try:
            a = rendered("A")
            eos = self.tokenizer.eos_token_id
            ends = [i for i, t in enumerate(a) if t == eos]  # the reply's end-of-turn: whatever follows it
            if ends:
                n = ends[-1] + 1
            else:  # a template without one (a plain transcript): up to where the next message differs
                b = rendered("B")
                n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        except APIError:
            return
        if 1 < n < self.context:
            self.scheduler.submit(Request(prompt=list(a[:n]), max_tokens=0, emit=lambda event: None, warm=True))


def normalize_message(m: Any, i: int, keeps_reasoning: bool = False) -> dict:
    """One request message in the shape the template takes. An assistant's reasoning goes into its
    content as <think>…</think> (the Jinja templates read it there), or, with `keeps_reasoning`
    (DeepSeek's own encodings, V3.2 and V4), stays in `reasoning_content`, where they read it
    also for a turn that only calls tools."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise APIError(400, f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
    m = dict(m)
    content = m.get("content")
    if isinstance(content, list):  # content parts: the text ones
        if not all(isinstance(p, dict) for p in content):
            raise APIError(400, f"messages[{i}].content parts must be objects", param=f"messages[{i}].content")
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    elif content is not None and not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string or an array of parts", param=f"messages[{i}].content")
    if m["role"] == "assistant":
        reasoning = m.pop("reasoning_content", None) or m.pop("reasoning", None)
        if reasoning and keeps_reasoning:
            m["reasoning_content"] = reasoning
        elif reasoning and content is not None:
            content = f"<think>{reasoning}{THINK_END}{content}"  # the template drops it as it says
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for c in calls:
                f = dict(c.get("function") or {})
                if not isinstance(f.get("arguments"), str):
                    f["arguments"] = json.dumps(f.get("arguments") or {}, ensure_ascii=False)
                fixed.append({"type": c.get("type", "function"), "id": c.get("id"), "function": f})
            m["tool_calls"] = fixed
        elif "tool_calls" in m:
            del m["tool_calls"]
    m["content"] = content or ""  # (transformers drops a None content; the templates render "" alike)
    return m


def describe_tools(tools: list, template: str, choice) -> str:
    """Tool descriptions for templates that do not render `tools`, in the call format the model knows."""
    lines = ["## Tools", "You have access to the following tools:"]
    for t in tools:
        f = t["function"]
        lines += [f"\n### {f.get('name')}", f"Description: {f.get('description', '')}",
                  f"\nParameters: {json.dumps(f.get('parameters', {}), ensure_ascii=False)}"]
    if call_format(None, template) == "v3.1":
        call = "<｜tool▁call▁begin｜>tool_call_name<｜tool▁sep｜>tool_call_arguments<｜tool▁call▁end｜>"
    else:  # V3 / R1
        call = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>tool_call_name\n```json\ntool_call_arguments\n```<｜tool▁call▁end｜>"
    lines += ["\nIMPORTANT: ALWAYS adhere to this exact format for tool use:",
              f"<｜tool▁calls▁begin｜>{call}{{additional_tool_calls}}<｜tool▁calls▁end｜>",
              "\nWhere:\n- `tool_call_name` must be an exact match to one of the available tools",
              "- `tool_call_arguments` must be valid JSON that aligns with the tool's parameters"]
    if choice == "required" or isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        lines.append(f"\nYou must call {'the tool ' + name if name else 'at least one tool'} in your reply.")
    return "\n".join(lines)


# -- turning scheduler events into OpenAI responses -------------------------------------------
class Events:
    """The scheduler's events for one request, on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.loop = loop

    def emit(self, event: tuple) -> None:  # called on the generation thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop has closed (shutting down): nobody is listening
            pass


def usage(finish: Finish) -> dict:
    tps = finish.completion_tokens / finish.decode_seconds if finish.decode_seconds > 0 else None
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finish.cached_tokens},
            "timings": {"prompt_seconds": round(finish.prompt_seconds, 4), "decode_seconds": round(finish.decode_seconds, 4),
                        "decode_tokens_per_second": round(tps, 2) if tps else None}}


def token_logprobs(tokenizer, piece: Piece) -> Optional[dict]:
    if piece.logprob is None:
        return None

    def entry(t, lp):
        s = tokenizer.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    return {**entry(piece.token, piece.logprob), "top_logprobs": [entry(t, lp) for t, lp in piece.top or []]}


def chat_events(parser: ReplyParser, piece_text: str, final: bool = False) -> list[dict]:
    """Parser events -> OpenAI delta objects."""
    events = parser.feed(piece_text) if piece_text else []
    if final:
        events += parser.flush()
    deltas = []
    for e in events:
        if e[0] == "content":
            deltas.append({"content": e[1]})
        elif e[0] == "reasoning":
            deltas.append({"reasoning_content": e[1], "reasoning": e[1]})
        elif e[0] == "call":
            deltas.append({"tool_calls": [{"index": e[1], "id": e[2].id, "type": "function",
                                           "function": {"name": e[2].name, "arguments": ""}}]})
        elif e[0] == "arguments":
            deltas.append({"tool_calls": [{"index": e[1], "function": {"arguments": e[2]}}]})
    return deltas


class Collected:
    """What a chat reply said, gathered from its deltas: the assistant message a client sends back."""

    def __init__(self):
        self.reasoning = self.content = ""

    def add(self, deltas: list[dict]) -> list[dict]:
        for d in deltas:
            self.content += d.get("content", "")
            self.reasoning += d.get("reasoning_content", "")
        return deltas

    def message(self, calls) -> dict:
        message = {"role": "assistant", "content": self.content if self.content or not calls else None}
        if self.reasoning:
            message["reasoning_content"] = message["reasoning"] = self.reasoning
        if calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        return message


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def build_app(server: Server) -> Starlette:
    s = server.settings

    def require_ready():
        if not server.ready:
            raise APIError(503, server.load_error or "the model is still loading", "server_error", "loading")

    async def read_json(request: HTTPRequest) -> dict:
        limit = int(s.max_body_mb * 1024 * 1024)
        if int(request.headers.get("content-length") or 0) > limit:
            raise APIError(413, f"the request body is over {s.max_body_mb} MB", code="body_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"the request body is over {s.max_body_mb} MB", code="body_too_large")
        try:
            data = json.loads(body)
        except ValueError as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return data

    async def run(request: HTTPRequest, kind: str):
        require_ready()
        body = await read_json(request)
        server.check_model(body)
        stream = field(body, "stream", False)
        include_usage = bool(field(body, "stream_options", {}).get("include_usage")) if stream else True
        loop = asyncio.get_running_loop()
        events = Events(loop)
        if kind == "chat":
            prompt, thinking, tools, opening = await loop.run_in_executor(None, server.chat_prompt, body)
            parser = ReplyParser(thinking, tools)
        else:
            prompt = field(body, "prompt")
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                prompt = list(prompt)
            elif isinstance(prompt, str) and prompt:
                prompt = await loop.run_in_executor(None, server.tokenizer.encode, prompt)
            else:
                raise APIError(400, "'prompt' must be a non-empty string or array of token ids", param="prompt")
            if max(prompt) >= server.vocab or min(prompt) < 0:
                raise APIError(400, "a token id in 'prompt' is outside the vocabulary", param="prompt")
            parser = None
        req = server.request(body, prompt, events.emit)
        if kind == "chat" and opening:
            tok = server.tokenizer
            think_end = tok.encode(THINK_END, add_special_tokens=False) if thinking else None
            req.logits_processors.append(ForcedOpening(tok.encode(opening, add_special_tokens=False), len(prompt),
                                                       think_end, set(tok.eos_token_ids)))
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        server.scheduler.submit(req)
        head = {"id": rid, "created": created, "model": server.model_id, "system_fingerprint": "mlx-deepseek"}
        if stream:
            return StreamingResponse(stream_reply(req, events, parser, head, include_usage, kind, body),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await whole_reply(request, req, events, parser, head, kind, body)

    async def next_event(events: Events):
        """The next event, or None after `keepalive_s` without one (then a keep-alive comment goes out)."""
        try:
            return await asyncio.wait_for(events.queue.get(), timeout=s.keepalive_s)
        except asyncio.TimeoutError:
            return None

    async def stream_reply(req: Request, events: Events, parser, head: dict, include_usage: bool, kind: str, body: dict):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        said = Collected()

        def chunk(delta=None, finish=None, logprobs=None, text=None):
            if kind == "chat":
                choice = {"index": 0, "delta": delta or {}, "logprobs": logprobs, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
            return sse({**head, "object": obj, "choices": [choice]})

        try:
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await next_event(events)
                if event is None:
                    yield ": keep-alive\n\n"
                    continue
                if event[0] == "error":
                    yield sse({"error": {"message": event[1], "type": "server_error", "code": None}})
                    return
                if event[0] == "token":
                    piece: Piece = event[1]
                    lp = token_logprobs(server.tokenizer, piece)
                    if kind == "chat":
                        deltas = said.add(chat_events(parser, piece.text))
                        if lp is not None:
                            deltas = deltas or [{}]
                        for i, d in enumerate(deltas):
                            yield chunk(d, logprobs={"content": [lp]} if lp and i == 0 else None)
                    elif piece.text or lp:
                        yield chunk(text=piece.text, logprobs=completion_logprobs([piece], server.tokenizer) if lp else None)
                    continue
                finish: Finish = event[1]
                if kind == "chat":
                    for d in said.add(chat_events(parser, "", final=True)):
                        yield chunk(d)
                    if finish.reason != "cancelled":
                        await asyncio.get_running_loop().run_in_executor(
                            None, server.warm, body, said.message(parser.calls))
                reason = finish_reason(finish, parser)
                yield chunk(finish=reason)
                if include_usage:
                    yield sse({**head, "object": obj, "choices": [], "usage": usage(finish)})
                yield "data: [DONE]\n\n"
                return
        finally:
            req.cancel()  # the client went away (or the reply ended): free its slot

    async def whole_reply(request: HTTPRequest, req: Request, events: Events, parser, head: dict, kind: str,
                          body: dict):
        pieces: list[Piece] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if event[0] == "error":
                    raise APIError(500, event[1], "server_error")
                if event[0] == "token":
                    pieces.append(event[1])
                    continue
                finish = event[1]
                break
        finally:
            req.cancel()
        text = "".join(p.text for p in pieces)
        want_lp = req.logprobs is not None
        if kind == "chat":
            said = Collected()
            said.add(chat_events(parser, text, final=True))
            message = said.message(parser.calls)
            if finish.reason != "cancelled":
                await asyncio.get_running_loop().run_in_executor(None, server.warm, body, message)
            lp = {"content": [token_logprobs(server.tokenizer, p) for p in pieces]} if want_lp else None
            choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish_reason(finish, parser)}
            obj = "chat.completion"
        else:
            lp = completion_logprobs(pieces, server.tokenizer) if want_lp else None
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason(finish, None)}
            obj = "text_completion"
        return JSONResponse({**head, "object": obj, "choices": [choice], "usage": usage(finish)})

    async def chat_completions(request):
        return await run(request, "chat")

    async def completions(request):
        return await run(request, "completion")

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                                         "owned_by": "mlx-deepseek", "context_length": server.context}]})

    async def health(request):
        if not server.ready:
            return JSONResponse({"status": "error" if server.load_error else "loading", "message": server.load_error},
                                status_code=503)
        store = server.scheduler.store
        return JSONResponse({"status": "ok", "model": server.model_id, **server.scheduler.load,
                             "cache": {"entries": len(store), "bytes": store.nbytes, "budget_bytes": store.budget,
                                       "lookups": store.lookups, "hits": store.hits},
                             **({"experts": {"hit_rate": server.expert_stats.hit_rate, "bytes_read": server.expert_stats.bytes_read,
                                             "gb_per_token": server.expert_stats.gb_per_token}}
                                if server.expert_stats is not None else {})})

    async def page(request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    def guarded(handler):
        async def wrapped(request):
            try:
                if s.api_key and request.headers.get("authorization") != f"Bearer {s.api_key}":
                    raise APIError(401, "a valid API key is required (Authorization: Bearer ...)",
                                   "authentication_error", "invalid_api_key")
                return await handler(request)
            except APIError as e:
                return e.response()
        return wrapped

    routes = [
        Route("/v1/chat/completions", guarded(chat_completions), methods=["POST"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/", page, methods=["GET"]),
    ]
    middleware = []
    if s.allowed_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=s.allowed_origins, allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        return APIError(status, f"{request.method} {request.url.path}: no such route", code="not_found").response()

    async def server_error(request, exc):
        return APIError(500, f"internal error: {exc}", "server_error").response()

    return Starlette(routes=routes, middleware=middleware,
                     exception_handlers={404: not_found, 405: not_found, 500: server_error})


def finish_reason(finish: Finish, parser: Optional[ReplyParser]) -> str:
    if parser is not None and parser.calls and finish.reason == "stop":
        return "tool_calls"
    return "stop" if finish.reason == "cancelled" else finish.reason


def completion_logprobs(pieces: list[Piece], tokenizer) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for p in pieces:
        out["tokens"].append(tokenizer.decode([p.token]))
        out["token_logprobs"].append(p.logprob)
        out["top_logprobs"].append({tokenizer.decode([t]): lp for t, lp in p.top or []})
        out["text_offset"].append(offset)
        offset += len(p.text)
    return out
