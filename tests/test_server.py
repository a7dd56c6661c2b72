"""The real server on a loopback port (tiny DeepSeek-V3 model, R1's real tokenizer and template),
driven with the official openai client and raw HTTP. Greedy replies are checked against the same
model run in this process."""

import json
import threading
import time

import httpx2 as httpx  # what the openai client itself uses
import pytest
from server_helpers import r1_tiny, running_server

openai = pytest.importorskip("openai")

KEY = "test-key"
BUDGET_GB = 0.0004  # 400 kB: a handful of conversations of this model (576 bytes per token), so LRU eviction runs


@pytest.fixture(scope="module")
def folder():
    return r1_tiny()


@pytest.fixture(scope="module")
def url(folder):
    with running_server(folder, "--api-key", KEY, "--cache-memory-gb", str(BUDGET_GB), "--max-concurrency", "8",
                        "--keepalive-s", "0.02", "--max-body-mb", "0.05") as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(folder):
    from mlx_deepseek import load

    return load(folder)


def serial_greedy(local, tokens, n):
    from mlx_deepseek.generate import generate

    model, tokenizer = local
    return generate(model, tokenizer, tokens, n, temp=0.0)


def rendered(local, messages):
    from mlx_deepseek.chat_template import render

    return render(local[1], messages)[0]


def test_models_and_health(client, url):
    models = client.models.list().data
    assert [m.id for m in models] == ["r1-tokenizer-" + r1_tiny().name.split("r1-tokenizer-")[1]]
    health = httpx.get(url + "/health").json()  # open without the key
    assert health["status"] == "ok" and health["cache"]["budget_bytes"] == int(BUDGET_GB * 1e9)


def test_chat_reply_reasoning_usage_and_greedy_text(client, local):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=12, temperature=0)
    tokens = rendered(local, messages)
    assert r.usage.prompt_tokens == len(tokens) and r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"
    msg = r.choices[0].message.model_dump()
    # R1's template opens <think>: the reply is reasoning (this random model never closes it)
    expected = serial_greedy(local, tokens, 12)
    assert "</think>" not in expected
    assert msg["reasoning_content"] == msg["reasoning"] == expected and msg["content"] == ""


def test_streaming_chunks_as_openai_sends_them(client, local):
    messages = [{"role": "user", "content": "Stream please"}]
    chunks = list(client.chat.completions.create(model="default", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.model_dump().get("reasoning_content") or "" for c in chunks if c.choices)
    assert text == serial_greedy(local, rendered(local, messages), 10)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_thinking_off_closes_the_think(client, local):
    messages = [{"role": "user", "content": "No thinking"}]
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0,
                                       reasoning_effort="none")
    msg = r.choices[0].message.model_dump()
    tokens = rendered(local, messages) + local[1].encode("\n</think>\n\n", add_special_tokens=False)
    assert msg["content"] == serial_greedy(local, tokens, 6).lstrip("\n") and not msg.get("reasoning_content")
    assert r.usage.prompt_tokens == len(tokens)


def test_stop_string_ends_the_reply(client, local):
    prompt = [0, 1000, 2000, 3000]
    full = serial_greedy(local, prompt, 16)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    r = client.completions.create(model="default", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_second_turn_reuses_the_cache_and_tool_results_render(client, local):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    first = [{"role": "user", "content": "Weather in Paris? " * 20}]
    r1 = client.chat.completions.create(model="default", messages=first, max_tokens=4, temperature=0, tools=tools)
    assert r1.usage.prompt_tokens_details.cached_tokens <= 1  # at most the BOS other conversations share
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    second = first + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"}]
    r2 = client.chat.completions.create(model="default", messages=second, max_tokens=4, temperature=0, tools=tools)
    # the template renders the call and its result; the shared start of the conversation is not prefilled again
    from mlx_deepseek.server.app import describe_tools

    system = [{"role": "system", "content": describe_tools(tools, local[1].chat_template, "auto")}]
    expected = rendered(local, system + [dict(m, content=m["content"] or "") for m in second])
    assert r2.usage.prompt_tokens == len(expected)
    assert "22 C and sunny" in local[1].decode(expected) and "get_weather\n```json" in local[1].decode(expected)
    before = rendered(local, system + first)
    shared = next(i for i, (a, b) in enumerate(zip(before, expected)) if a != b)  # up to the generation prompt
    assert shared > 200 and r2.usage.prompt_tokens_details.cached_tokens == shared


def test_a_returning_conversation_finds_its_whole_history_cached(client, local):
    """R1's template drops a plain reply's reasoning from the history, so what was generated is not
    what comes back; the warm-up prefilled the history as the template renders it."""
    from mlx_deepseek.server.app import normalize_message

    first = [{"role": "user", "content": "Tell me a story about caches. " * 5}]
    r = client.chat.completions.create(model="default", messages=first, max_tokens=6, temperature=0)
    back = first + [r.choices[0].message.model_dump(exclude_none=True), {"role": "user", "content": "Go on."}]
    assert back[1]["reasoning_content"]  # R1 opened a <think>: the reply was reasoning, now dropped
    r2 = client.chat.completions.create(model="default", messages=back, max_tokens=2, temperature=0)
    expected = rendered(local, [normalize_message(m, i) for i, m in enumerate(back)])
    end_of_reply = max(i for i, t in enumerate(expected) if t == local[1].eos_token_id) + 1
    assert r2.usage.prompt_tokens == len(expected)
    assert r2.usage.prompt_tokens_details.cached_tokens == end_of_reply


def test_logprobs(client):
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy: the top one


def expect_error(response, status, words):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) >= {"message", "type", "code"} and words in err["message"], err


def test_bad_requests_are_4xx_and_the_server_keeps_serving(url, client):
    h = {"Authorization": f"Bearer {KEY}"}
    chat = url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    expect_error(httpx.post(chat, content=b"{not json", headers=h), 400, "not valid JSON")
    expect_error(httpx.post(chat, json={"messages": msgs, "max_tokens": "ten"}, headers=h), 400, "'max_tokens' must be an integer")
    expect_error(httpx.post(chat, json={"messages": msgs, "temperature": True}, headers=h), 400, "'temperature' must be a number")
    expect_error(httpx.post(chat, json={"messages": "hi"}, headers=h), 400, "'messages' must be an array")
    expect_error(httpx.post(chat, json={"messages": msgs, "max_tokens": -5}, headers=h), 400, "at least 1")
    expect_error(httpx.post(chat, json={"messages": msgs, "n": 2}, headers=h), 400, "n = 1")
    expect_error(httpx.post(chat, json={"messages": msgs, "model": "gpt-4o"}, headers=h), 404, "not served here")
    expect_error(httpx.post(chat, json={"messages": [{"role": "user", "content": "x " * 30000}]}, headers=h), 413, "over")
    expect_error(httpx.post(url + "/v1/completions", json={"prompt": list(range(5000))}, headers=h), 400,
                 "context is 4096 tokens")
    expect_error(httpx.post(chat, json={"messages": msgs}), 401, "API key")
    expect_error(httpx.post(chat, json={"messages": msgs}, headers={"Authorization": "Bearer wrong"}), 401, "API key")
    expect_error(httpx.get(url + "/v1/nothing", headers=h), 404, "no such route")
    r = client.chat.completions.create(model="default", messages=msgs, max_tokens=2)
    assert r.usage.completion_tokens == 2
    # an unknown field is ignored
    assert httpx.post(chat, json={"messages": msgs, "max_tokens": 1, "frobnicate": 3}, headers=h).status_code == 200


def test_eight_clients_at_once_each_equal_to_its_serial_reply(url, client, local):
    prompts = [[0] + [100 + 37 * i + j for j in range(3 + 11 * i)] for i in range(8)]
    lengths = [24 - 2 * i for i in range(8)]
    expected = [serial_greedy(local, p, n) for p, n in zip(prompts, lengths)]
    results, raw = [None] * 8, {}

    def one(i):
        # two of them ask for logprobs: while they run, steps are read before the next is queued
        extra = {"logprobs": 1} if i in (2, 5) else {}
        r = client.completions.create(model="default", prompt=prompts[i], max_tokens=lengths[i], temperature=0, **extra)
        results[i] = r.choices[0].text

    def queued():  # a ninth request waits in the queue: keep-alive comments flow meanwhile
        with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"prompt": [0, 5], "max_tokens": 2, "stream": True}, timeout=60) as r:
            raw["body"] = "".join(r.iter_text())

    before = httpx.get(url + "/health").json()["decode_steps"]
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)] + [threading.Thread(target=queued)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert time.time() - start < 120
    assert results == expected
    health = httpx.get(url + "/health").json()
    assert health["max_batch"] > 1  # they really were decoded together
    assert health["decode_steps"] - before < sum(lengths)  # fewer forwards than tokens
    assert health["cache"]["bytes"] <= health["cache"]["budget_bytes"]
    assert ": keep-alive" in raw["body"] and raw["body"].rstrip().endswith("data: [DONE]")


def test_a_client_that_disconnects_mid_stream_frees_its_slot(url, client):
    h = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", url + "/v1/chat/completions", headers=h, timeout=60,
                      json={"messages": [{"role": "user", "content": "long"}], "max_tokens": 3000, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(g.startswith("data: ") for g in got)
    deadline = time.time() + 20
    while httpx.get(url + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.1)
    health = httpx.get(url + "/health").json()
    assert health["running"] == 0 and health["prefilling"] == 0
    assert health["decode_steps"] < 3000 + 500  # it did not decode its 3000 tokens
    assert client.chat.completions.create(model="default", messages=[{"role": "user", "content": "after"}],
                                          max_tokens=2).usage.completion_tokens == 2


def test_sse_is_plain_text_event_stream(url):
    with httpx.stream("POST", url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_cache_dir_keeps_warm_8bit_caches_across_a_restart_and_cors(folder, tmp_path):
    messages = [{"role": "user", "content": "Remember this conversation. " * 10}]
    body = {"messages": messages, "max_tokens": 3, "temperature": 0}
    flags = ("--cache-dir", str(tmp_path / "caches"), "--allowed-origins", "http://localhost:3000",
             "--kv-bits", "8", "--kv-group-size", "32")  # quantized caches, served and saved as such
    with running_server(folder, *flags) as u:
        first = httpx.post(u + "/v1/chat/completions", json=body).json()
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        preflight = httpx.options(u + "/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
        assert preflight.headers.get("access-control-allow-origin") == "http://localhost:3000"
        other = httpx.options(u + "/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers
    # the request's cache (prompt and reply) and its warm-up (the history as the template re-renders it)
    assert len(list((tmp_path / "caches").glob("*.safetensors"))) == 2
    with running_server(folder, *flags) as u:
        assert httpx.get(u + "/health").json()["cache"]["entries"] == 2
        again = httpx.post(u + "/v1/chat/completions", json=body).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == first["usage"]["prompt_tokens"] - 1
        assert again["choices"][0]["message"] == first["choices"][0]["message"]


def test_mtp_serves_the_plain_greedy_reply():
    """--mtp (tinyseek's own MTP layer drafts): the same greedy tokens, in fewer main steps."""
    from conftest import SHARED

    from mlx_deepseek import load
    from mlx_deepseek.generate import generate

    tiny = SHARED / "models/tinyseek-py"
    model, tokenizer = load(tiny)
    prompt = tokenizer.encode("import os\nimport sys\n\ndef main():\n")
    expected = generate(model, tokenizer, prompt, 24, temp=0.0)
    with running_server(tiny, "--mtp") as u:
        body = {"prompt": prompt, "max_tokens": 24, "temperature": 0}
        r = httpx.post(u + "/v1/completions", json=body).json()
        assert r["choices"][0]["text"] == expected
        steps = httpx.get(u + "/health").json()["decode_steps"]
        assert 0 < steps < 24  # drafts were accepted: fewer main forwards than tokens
        again = httpx.post(u + "/v1/completions", json=body).json()
        assert again["choices"][0]["text"] == expected
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt) - 1
        refused = httpx.post(u + "/v1/completions", json={**body, "logprobs": 2})
        assert refused.status_code == 400 and "--mtp" in refused.json()["error"]["message"]


def test_health_is_503_until_a_model_is_loaded_and_says_why(tmp_path):
    import subprocess
    import sys

    from server_helpers import ROOT, free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_deepseek.server", "--model", str(tmp_path / "missing"),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, health = time.time() + 60, None
        while time.time() < deadline:
            try:
                health = httpx.get(url + "/health", timeout=2)
                if health.json()["status"] == "error":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert health.status_code == 503 and "could not load" in health.json()["message"]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_tool_call_the_model_generates_comes_back_as_tool_calls():
    """A model whose weights script its reply (reasoning, content, then a DeepSeek tool call): the
    server parses what it really generated, whole and streamed, with the openai client."""
    from server_helpers import scripted

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    with running_server(scripted()) as u:
        c = openai.OpenAI(base_url=u + "/v1", api_key="none", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="default", messages=messages, tools=tools, temperature=0, max_tokens=60)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.model_dump()["reasoning_content"] == "Let me check."
        assert choice.message.content == "Sure"
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

        chunks = list(c.chat.completions.create(model="default", messages=messages, tools=tools, temperature=0,
                                                max_tokens=60, stream=True))
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        name = "".join(tc.function.name or "" for d in deltas for tc in d.tool_calls or [])
        args = "".join(tc.function.arguments or "" for d in deltas for tc in d.tool_calls or [])
        assert name == "get_weather" and json.loads(args) == {"city": "Paris"}
        assert "".join(d.content or "" for d in deltas) == "Sure"
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]

        # the call and its result go back through the template for the next turn
        follow = messages + [choice.message.model_dump(exclude_none=True),
                             {"role": "tool", "tool_call_id": call.id, "content": "18 C"}]
        r2 = c.chat.completions.create(model="default", messages=follow, tools=tools, temperature=0, max_tokens=3)
        # R1's template re-renders the call (and drops the "\n" after <think> the generation prompt
        # added), but the warm-up cached the history as it comes back: the call is not prefilled again
        assert r.usage.prompt_tokens < r2.usage.prompt_tokens_details.cached_tokens < r2.usage.prompt_tokens


def test_tool_choice_required_is_enforced_after_the_reasoning():
    """The scripted model would say "Sure" before its call; with tool_choice "required" the call
    opens right after </think> (forced), and the model's own call follows."""
    from server_helpers import scripted

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    with running_server(scripted()) as u:
        c = openai.OpenAI(base_url=u + "/v1", api_key="none", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="default", messages=messages, tools=tools, temperature=0, max_tokens=60,
                                      tool_choice="required")
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        assert choice.message.model_dump()["reasoning_content"] == "Let me check."
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        for bad in ({"type": "function", "function": {"name": "get_time"}}, "always", {"type": "function"}):
            with pytest.raises(openai.BadRequestError, match="tool_choice"):
                c.chat.completions.create(model="default", messages=messages, tools=tools, tool_choice=bad)


def test_a_named_tool_choice_forces_that_calls_opening(client, local):
    """A random model, thinking off: the reply's first tokens are the call's opening in R1's format,
    each forced (logprob 0: every other token was masked)."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
             {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    opening = local[1].encode("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n",
                              add_special_tokens=False)
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Time?"}], tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}},
                                       reasoning_effort="none", temperature=0, max_tokens=len(opening) + 2,
                                       logprobs=True)
    tokens = r.choices[0].logprobs.content
    assert "".join(t.token for t in tokens[: len(opening)]) == local[1].decode(opening)
    assert all(t.logprob == 0.0 for t in tokens[: len(opening)])


def test_a_seed_gives_the_same_sampled_reply_alone_or_among_others(client):
    def ask(seed, prompt=(0, 7, 8, 9)):
        return client.completions.create(model="default", prompt=list(prompt), max_tokens=12, temperature=1.0,
                                         top_p=0.9, seed=seed).choices[0].text

    alone = ask(1234)
    results = {}
    jobs = [(i, 1234 if i % 2 == 0 else 99 + i) for i in range(6)]
    threads = [threading.Thread(target=lambda i=i, s=s: results.__setitem__(i, ask(s))) for i, s in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [results[i] for i, s in jobs if s == 1234] == [alone] * 3
    assert len({results[i] for i, s in jobs if s != 1234} | {alone}) > 1  # other seeds sample otherwise
