"""The real server on a DeepSeek-V4 checkpoint as published (V4's real tokenizer, DeepSeek's own
encoding): requests take turns on one cache, each reply equal to the same model run here, a
returning conversation restored from a snapshot, tools rendered in V4's DSML format."""

import pytest
from checkpoints import build_v4
from server_helpers import running_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def folder():
    return build_v4("v4_chat", "native")


@pytest.fixture(scope="module")
def client(folder):
    with running_server(folder, "--max-tokens", "8", timeout=180) as u:
        yield openai.OpenAI(base_url=u + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(folder):
    from mlx_deepseek import load

    return load(folder)


def expected_reply(local, messages, n, tools=None, **kwargs):
    from mlx_deepseek.chat_template import render
    from mlx_deepseek.generate import generate

    model, tokenizer = local
    tokens, opens_think = render(tokenizer, messages, tools, "deepseek_v4", **kwargs)
    return tokens, generate(model, tokenizer, tokens, n, temp=0.0), opens_think


def test_v4_replies_equal_the_model_run_here_and_a_second_turn_is_restored(client, local):
    first = [{"role": "user", "content": "Tell me about latent attention. " * 8}]
    tokens, text, opens_think = expected_reply(local, first, 8)
    assert opens_think  # V4's thinking mode: the reply starts in its reasoning
    r = client.chat.completions.create(model="default", messages=first, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(tokens) and r.usage.completion_tokens == 8
    message = r.choices[0].message.model_dump()
    # a random model does not close its <think>: all of it is reasoning
    assert message["reasoning_content"] + (message["content"] or "") == text

    chat = [{"role": "user", "content": "Hello there"}]
    chat_tokens, chat_text, opens = expected_reply(local, chat, 6, thinking=False)
    assert not opens
    r_chat = client.chat.completions.create(model="default", messages=chat, max_tokens=6, temperature=0,
                                            reasoning_effort="none")
    assert r_chat.choices[0].message.content == chat_text and r_chat.usage.prompt_tokens == len(chat_tokens)

    # the first conversation returns: the shared prefix comes back from a snapshot, not a prefill
    second = first + [{"role": "assistant", "content": "Sure."}, {"role": "user", "content": "More, please."}]
    tokens2, text2, _ = expected_reply(local, second, 8)
    r2 = client.chat.completions.create(model="default", messages=second, max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
    chunks = list(r2)
    streamed = "".join((c.choices[0].delta.model_dump().get("reasoning_content") or "") + (c.choices[0].delta.content or "")
                       for c in chunks if c.choices)
    assert streamed == text2
    usage = chunks[-1].usage
    assert usage.prompt_tokens == len(tokens2) and usage.prompt_tokens_details.cached_tokens > 0


def test_v4_tools_and_results_render_in_dsml(client, local):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 C and sunny"}]
    tokens, text, _ = expected_reply(local, messages, 4, tools=tools)
    prompt = local[1].decode(tokens)
    assert "<｜DSML｜invoke name=\"get_weather\">" in prompt and "22 C and sunny" in prompt and "get_weather" in prompt
    r = client.chat.completions.create(model="default", messages=messages, tools=tools, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(tokens)  # the server renders exactly this (no extra system message)
    message = r.choices[0].message.model_dump()
    assert (message["reasoning_content"] or "") + (message["content"] or "") == text

