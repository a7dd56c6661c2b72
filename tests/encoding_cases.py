"""What the V3.2 and V4 prompt-format tests share: a reference encoder's stored outputs
(tests/data/encoding_*_cases.json) and the checks our encoder must pass on them."""

import copy
import json
from pathlib import Path

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
