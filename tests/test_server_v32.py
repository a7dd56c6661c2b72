"""The real server on a tiny DeepSeek-V3.2 model (sparse attention past 16 cached tokens) with
V3.2's real tokenizer and DeepSeek's V3.2 encoding: batched replies equal to the model run here."""

import threading

import pytest
from server_helpers import running_server, with_tokenizer

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def folder():
    return with_tokenizer("v32", "deepseek-v3.2", "v32")


@pytest.fixture(scope="module")
def local(folder):
    from mlx_deepseek import load

    return load(folder)


def expected(local, messages, n, **kwargs):
    from mlx_deepseek.chat_template import render
    from mlx_deepseek.generate import generate

    model, tokenizer = local
    tokens, _ = render(tokenizer, messages, None, "deepseek_v32", **kwargs)
    return tokens, generate(model, tokenizer, tokens, n, temp=0.0)


def test_v32_served_batched_and_returning(folder, local):
    assert local[0].model_type == "deepseek_v32"
    conversations = [[{"role": "user", "content": f"Question {i}: " + "why sparse attention? " * (3 + 4 * i)}]
                     for i in range(3)]
    wanted = [expected(local, c, 10) for c in conversations]
    assert all(len(tokens) > 16 for tokens, _ in wanted)  # past index_topk: the sparse path runs
    with running_server(folder) as u:
        client = openai.OpenAI(base_url=u + "/v1", api_key="none", max_retries=0, timeout=120)
        replies = [None] * 3

        def ask(i):
            replies[i] = client.chat.completions.create(model="default", messages=conversations[i], max_tokens=10,
                                                        temperature=0)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for r, (tokens, text) in zip(replies, wanted):
            m = r.choices[0].message.model_dump()
            assert r.usage.prompt_tokens == len(tokens)
            assert (m.get("reasoning_content") or "") + (m["content"] or "") == text

        back = conversations[0] + [replies[0].choices[0].message.model_dump(exclude_none=True),
                                   {"role": "user", "content": "And then?"}]
        tokens, text = expected(local, [dict(m) for m in back], 6)
        r2 = client.chat.completions.create(model="default", messages=back, max_tokens=6, temperature=0)
        m = r2.choices[0].message.model_dump()
        assert (m.get("reasoning_content") or "") + (m["content"] or "") == text
        assert r2.usage.prompt_tokens == len(tokens) and r2.usage.prompt_tokens_details.cached_tokens > len(wanted[0][0]) - 2
