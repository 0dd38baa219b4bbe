"""The stream assembler: a streamed reply must record as the reply it would have been unstreamed."""

from __future__ import annotations

import itertools
import json
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiohttp_session_store.assembler import (
    AssembledStream,
    ChatStreamAssembler,
    CompletionSummary,
    completion_summary,
)
from aiohttp_session_store.sse import SSEEvent, SSEParser

HEADER: dict[str, Any] = {
    "id": "chatcmpl-abc",
    "object": "chat.completion.chunk",
    "created": 1_700_000_000,
    "model": "gpt-4o-2024-08-06",
    "system_fingerprint": "fp_123",
}
NONE_SUMMARY = CompletionSummary(None, None, None, None)


def chunk(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**HEADER, "choices": list(choices), **extra}


def delta(index: int = 0, finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "logprobs": None, "finish_reason": finish_reason}


def tool_delta(index: int, **fields: Any) -> dict[str, Any]:
    return {"index": index, **fields}


def assemble(*items: dict[str, Any] | str, **kwargs: int) -> AssembledStream:
    assembler = ChatStreamAssembler(**kwargs)
    for item in items:
        assembler.feed(SSEEvent(item if isinstance(item, str) else json.dumps(item)))
    return assembler.result()


def text_stream(
    finish_reason: str | None, usage: dict[str, Any] | None
) -> list[dict[str, Any] | str]:
    items: list[dict[str, Any] | str] = [
        chunk(delta(role="assistant", content="", refusal=None)),
        chunk(delta(content="Hel")),
        chunk(delta(content="lo")),
        chunk(delta(content=", wor")),
        chunk(delta(content="ld")),
        chunk(delta(finish_reason=finish_reason)),
    ]
    if usage is not None:
        items.append(chunk(usage=usage))
    items.append("[DONE]")
    return items


ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


class TestTextStream:
    def test_realistic_stream_with_zero_usage(self) -> None:
        items = text_stream("stop", ZERO_USAGE)
        result = assemble(*items)
        assert result.openai_shaped
        assert result.done
        assert result.error is None
        assert result.completion == {
            "id": "chatcmpl-abc",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-4o-2024-08-06",
            "system_fingerprint": "fp_123",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello, world"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }
        assert result.summary == CompletionSummary(0, 0, 0, "stop")
        assert result.raw_events == [i if isinstance(i, str) else json.dumps(i) for i in items]
        assert not result.raw_truncated

    def test_usage_is_kept_as_given(self) -> None:
        usage = {
            "prompt_tokens": 12,
            "completion_tokens": 5,
            "total_tokens": 17,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        result = assemble(*text_stream("stop", usage))
        assert result.completion is not None
        assert result.completion["usage"] == usage
        assert result.summary == CompletionSummary(12, 5, 17, "stop")

    def test_no_usage_chunk_means_no_usage_key(self) -> None:
        result = assemble(*text_stream("stop", None))
        assert result.completion is not None
        assert "usage" not in result.completion
        assert result.summary == CompletionSummary(None, None, None, "stop")

    @pytest.mark.parametrize("reason", ["length", "tool_calls", "content_filter", "stop"])
    def test_finish_reason_is_the_real_one(self, reason: str) -> None:
        result = assemble(*text_stream(reason, ZERO_USAGE))
        assert result.completion is not None
        assert result.completion["choices"][0]["finish_reason"] == reason
        assert result.summary.finish_reason == reason

    def test_finish_reason_never_given_is_none(self) -> None:
        result = assemble(chunk(delta(role="assistant", content="cut off")))
        assert result.completion is not None
        assert result.completion["choices"][0]["finish_reason"] is None
        assert result.summary.finish_reason is None
        assert not result.done

    def test_no_content_delta_gives_none_and_empty_content_gives_empty(self) -> None:
        none = assemble(chunk(delta(role="assistant")), chunk(delta(finish_reason="stop")))
        empty = assemble(chunk(delta(role="assistant", content="")))
        assert none.completion is not None
        assert empty.completion is not None
        assert none.completion["choices"][0]["message"]["content"] is None
        assert empty.completion["choices"][0]["message"]["content"] == ""

    def test_role_defaults_to_assistant_and_takes_the_given_one(self) -> None:
        default = assemble(chunk(delta(content="x")))
        given_role = assemble(chunk(delta(role="tool", content="x")), chunk(delta(role="user")))
        assert default.completion is not None
        assert given_role.completion is not None
        assert default.completion["choices"][0]["message"]["role"] == "assistant"
        assert given_role.completion["choices"][0]["message"]["role"] == "tool"

    def test_content_property_follows_the_stream(self) -> None:
        assembler = ChatStreamAssembler()
        assert assembler.content == ""
        for piece, expected in [("a", "a"), ("bc", "abc"), ("", "abc"), ("d", "abcd")]:
            assembler.feed(SSEEvent(json.dumps(chunk(delta(content=piece)))))
            assert assembler.content == expected
        # Asking does not disturb the assembled result.
        result = assembler.result()
        assert result.completion is not None
        assert result.completion["choices"][0]["message"]["content"] == "abcd"

    def test_result_mid_stream_is_a_snapshot(self) -> None:
        assembler = ChatStreamAssembler()
        logprob = {"content": [{"token": "a", "logprob": -0.1}]}
        assembler.feed(SSEEvent(json.dumps(chunk({**delta(content="a"), "logprobs": logprob}))))
        first = assembler.result()
        assembler.feed(SSEEvent(json.dumps(chunk({**delta(content="b"), "logprobs": logprob}))))
        assembler.feed(SSEEvent("[DONE]"))
        assert first.completion is not None
        assert first.completion["choices"][0]["message"]["content"] == "a"
        assert len(first.completion["choices"][0]["logprobs"]["content"]) == 1
        assert first.raw_events == [first.raw_events[0]]
        assert not first.done
        assert assembler.result().done

    def test_header_fields_come_from_the_first_chunk_that_has_them(self) -> None:
        first = {"id": "one", "object": "chat.completion.chunk", "choices": [delta(content="a")]}
        second = {**chunk(delta(content="b")), "id": "two", "model": "m2", "created": 5}
        result = assemble(first, second)
        assert result.completion is not None
        assert result.completion["id"] == "one"
        assert result.completion["model"] == "m2"
        assert result.completion["created"] == 5

    def test_system_fingerprint_absent_stays_absent(self) -> None:
        result = assemble({"id": "x", "model": "m", "created": 1, "choices": [delta(content="a")]})
        assert result.completion is not None
        assert "system_fingerprint" not in result.completion

    def test_cumulative_usage_takes_the_last_non_null(self) -> None:
        items = [
            chunk(
                delta(content="a"),
                usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            ),
            chunk(
                delta(content="b"),
                usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            ),
            chunk(delta(finish_reason="stop"), usage=None),
        ]
        assert assemble(*items).summary == CompletionSummary(3, 2, 5, "stop")

    def test_logprobs_concatenate(self) -> None:
        def lp(token: str) -> dict[str, Any]:
            return {
                "token": token,
                "logprob": -1.0,
                "bytes": list(token.encode()),
                "top_logprobs": [],
            }

        result = assemble(
            chunk({**delta(content="a"), "logprobs": {"content": [lp("a")], "refusal": None}}),
            chunk({**delta(content="b"), "logprobs": {"content": [lp("b")], "refusal": None}}),
            chunk(delta(finish_reason="stop")),
        )
        assert result.completion is not None
        assert result.completion["choices"][0]["logprobs"] == {
            "content": [lp("a"), lp("b")],
            "refusal": None,
        }

    def test_refusal_is_joined(self) -> None:
        result = assemble(chunk(delta(refusal="I can't ")), chunk(delta(refusal="help.")))
        assert result.completion is not None
        message = result.completion["choices"][0]["message"]
        assert message["refusal"] == "I can't help."
        assert message["content"] is None


class TestReasoning:
    def test_reasoning_content_is_joined(self) -> None:
        result = assemble(
            chunk(delta(role="assistant", reasoning_content="Let me ")),
            chunk(delta(reasoning_content="think.")),
            chunk(delta(content="42")),
            chunk(delta(finish_reason="stop")),
        )
        assert result.completion is not None
        assert result.completion["choices"][0]["message"] == {
            "role": "assistant",
            "content": "42",
            "reasoning_content": "Let me think.",
        }

    def test_reasoning_field_is_accepted_too(self) -> None:
        result = assemble(chunk(delta(reasoning="a")), chunk(delta(reasoning="b", content="c")))
        assert result.completion is not None
        assert result.completion["choices"][0]["message"]["reasoning_content"] == "ab"

    def test_both_names_in_one_delta_are_not_doubled(self) -> None:
        result = assemble(chunk(delta(reasoning_content="x", reasoning="x")))
        assert result.completion is not None
        assert result.completion["choices"][0]["message"]["reasoning_content"] == "x"

    def test_no_reasoning_means_no_key(self) -> None:
        result = assemble(chunk(delta(content="a", reasoning_content=None)))
        assert result.completion is not None
        assert "reasoning_content" not in result.completion["choices"][0]["message"]


class TestToolCalls:
    ARGS_A = '{"city": "Paris", "unit": "celsius"}'
    ARGS_B = '{"timezone": "Europe/Paris"}'

    def stream(self) -> list[dict[str, Any] | str]:
        items: list[dict[str, Any] | str] = [
            chunk(delta(role="assistant", content=None)),
            chunk(
                delta(
                    tool_calls=[
                        tool_delta(
                            0,
                            id="call_a",
                            type="function",
                            function={"name": "get_", "arguments": ""},
                        )
                    ]
                )
            ),
            chunk(delta(tool_calls=[tool_delta(0, function={"name": "weather"})])),
            chunk(
                delta(
                    tool_calls=[
                        tool_delta(
                            1,
                            id="call_b",
                            type="function",
                            function={"name": "get_time", "arguments": ""},
                        )
                    ]
                )
            ),
        ]
        a, b = self.ARGS_A, self.ARGS_B
        # Interleaved: pieces of both calls alternate, some chunks carry both.
        for i in range(max(len(a), len(b))):
            calls = []
            if i < len(b):
                calls.append(tool_delta(1, function={"arguments": b[i]}))
            if i < len(a):
                calls.append(tool_delta(0, function={"arguments": a[i]}))
            if i % 3 == 0:
                items.append(chunk(delta(tool_calls=calls)))
            else:
                items.extend(chunk(delta(tool_calls=[call])) for call in calls)
        items.append(chunk(delta(finish_reason="tool_calls")))
        items.append("[DONE]")
        return items

    def test_two_interleaved_tool_calls(self) -> None:
        result = assemble(*self.stream())
        assert result.completion is not None
        choice = result.completion["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"] == {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": self.ARGS_A},
                },
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": self.ARGS_B},
                },
            ],
        }
        assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {
            "city": "Paris",
            "unit": "celsius",
        }
        assert result.summary.finish_reason == "tool_calls"

    def test_tool_calls_are_ordered_by_index_not_arrival(self) -> None:
        result = assemble(
            chunk(delta(tool_calls=[tool_delta(1, id="b", function={"name": "f1"})])),
            chunk(delta(tool_calls=[tool_delta(0, id="a", function={"name": "f0"})])),
        )
        assert result.completion is not None
        calls = result.completion["choices"][0]["message"]["tool_calls"]
        assert [c["id"] for c in calls] == ["a", "b"]
        assert calls[0] == {
            "id": "a",
            "type": "function",
            "function": {"name": "f0", "arguments": ""},
        }

    def test_tool_calls_without_index_use_ids(self) -> None:
        result = assemble(
            chunk(delta(tool_calls=[{"id": "a", "function": {"name": "f", "arguments": "{"}}])),
            chunk(delta(tool_calls=[{"function": {"arguments": "}"}}])),
            chunk(delta(tool_calls=[{"id": "b", "function": {"name": "g", "arguments": "[]"}}])),
        )
        assert result.completion is not None
        calls = result.completion["choices"][0]["message"]["tool_calls"]
        assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
            ("a", "f", "{}"),
            ("b", "g", "[]"),
        ]

    def test_legacy_function_call(self) -> None:
        result = assemble(
            chunk(delta(role="assistant", function_call={"name": "look", "arguments": ""})),
            chunk(delta(function_call={"arguments": '{"q": '})),
            chunk(delta(function_call={"arguments": '"x"}'})),
            chunk(delta(finish_reason="function_call")),
        )
        assert result.completion is not None
        choice = result.completion["choices"][0]
        assert choice["message"] == {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "look", "arguments": '{"q": "x"}'},
        }
        assert choice["finish_reason"] == "function_call"


class TestChoices:
    def test_two_choices_each_with_its_own_content_and_finish_reason(self) -> None:
        result = assemble(
            chunk(delta(1, role="assistant", content=""), delta(0, role="assistant", content="")),
            chunk(delta(1, content="Bon")),
            chunk(delta(0, content="Hel")),
            chunk(delta(0, content="lo"), delta(1, content="jour")),
            chunk(delta(1, finish_reason="length")),
            chunk(delta(0, finish_reason="stop")),
            chunk(usage={"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}),
            "[DONE]",
        )
        assert result.completion is not None
        assert result.completion["choices"] == [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "finish_reason": "stop",
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": "Bonjour"},
                "finish_reason": "length",
            },
        ]
        assert result.summary == CompletionSummary(4, 6, 10, "stop")

    def test_content_property_is_choice_zero(self) -> None:
        assembler = ChatStreamAssembler()
        assembler.feed(SSEEvent(json.dumps(chunk(delta(1, content="one")))))
        assembler.feed(SSEEvent(json.dumps(chunk(delta(0, content="zero")))))
        assert assembler.content == "zero"

    def test_choice_without_index_takes_its_position(self) -> None:
        result = assemble({"choices": [{"delta": {"content": "a"}}, {"delta": {"content": "b"}}]})
        assert result.completion is not None
        assert [c["message"]["content"] for c in result.completion["choices"]] == ["a", "b"]

    def test_a_whole_completion_sent_as_one_event(self) -> None:
        body = {
            **HEADER,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        result = assemble(body)
        assert result.completion is not None
        assert result.completion["choices"][0]["message"]["content"] == "hi"
        assert result.summary == CompletionSummary(1, 1, 2, "stop")


class TestNotOpenAI:
    def test_plain_text_stream_goes_to_raw_events(self) -> None:
        items = ["hello", "world", '{"type": "message_start"}', "[1, 2]", "[DONE]"]
        result = assemble(*items)
        assert not result.openai_shaped
        assert result.completion is None
        assert result.raw_events == items
        assert result.done
        assert result.summary == NONE_SUMMARY

    @pytest.mark.parametrize("data", ["null", "42", '"text"', "[]", "{not json", "", "   ", "{"])
    def test_non_object_events_are_ignored(self, data: str) -> None:
        result = assemble(data)
        assert not result.openai_shaped
        assert result.raw_events == [data]

    def test_garbage_inside_chunks_is_skipped(self) -> None:
        result = assemble(
            {"choices": ["x", None, 3, {"index": 0, "delta": "nope"}]},
            {"choices": [{"index": True, "delta": {"content": 5, "tool_calls": "x"}}]},
            {
                "choices": [
                    {"index": 0, "delta": {"tool_calls": [None, {"index": 0, "function": 3}]}}
                ]
            },
            {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": 1}]},
            {"object": "chat.completion.chunk", "choices": "not a list", "usage": "nope"},
        )
        assert result.openai_shaped
        assert result.completion is not None
        [choice] = result.completion["choices"]
        assert choice["message"]["content"] == "ok"
        assert choice["finish_reason"] is None
        assert choice["message"]["tool_calls"] == [
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        ]
        assert "usage" not in result.completion

    def test_deeply_nested_json_does_not_raise(self) -> None:
        result = assemble('{"a":' * 100_000 + "1" + "}" * 100_000)
        assert not result.openai_shaped

    def test_done_with_surrounding_whitespace(self) -> None:
        assert assemble(" [DONE]\n").done

    def test_object_chunk_without_choices_is_openai_shaped(self) -> None:
        result = assemble({"object": "chat.completion.chunk", "id": "x"})
        assert result.openai_shaped
        assert result.completion is not None
        assert result.completion["choices"] == []
        assert result.completion["id"] == "x"


class TestError:
    def test_error_event(self) -> None:
        error = {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}
        result = assemble({"error": error})
        assert result.error == error
        assert not result.openai_shaped
        assert result.completion is None

    def test_error_after_some_content_keeps_both(self) -> None:
        result = assemble(chunk(delta(content="partial")), {"error": "upstream closed"})
        assert result.error == "upstream closed"
        assert result.completion is not None
        assert result.completion["choices"][0]["message"]["content"] == "partial"

    def test_null_error_is_no_error(self) -> None:
        assert assemble({"error": None}).error is None


class TestRawEvents:
    def test_bounded_by_count(self) -> None:
        result = assemble("a", "b", "c", "d", "[DONE]", max_raw_events=3)
        assert result.raw_events == ["a", "b", "c"]
        assert result.raw_truncated
        assert result.done  # events past the bound are still interpreted

    def test_bounded_by_utf8_bytes(self) -> None:
        result = assemble("ab", "é", "c", max_raw_bytes=3)
        # "é" is one character but two bytes: 2 + 2 > 3, and only a prefix is kept.
        assert result.raw_events == ["ab"]
        assert result.raw_truncated

    def test_exactly_at_the_bound_is_kept(self) -> None:
        result = assemble("ab", "é", max_raw_bytes=4)
        assert result.raw_events == ["ab", "é"]
        assert not result.raw_truncated

    def test_chunks_past_the_raw_bound_are_still_assembled(self) -> None:
        result = assemble(*text_stream("stop", ZERO_USAGE), max_raw_events=1)
        assert result.completion is not None
        assert result.completion["choices"][0]["message"]["content"] == "Hello, world"

    def test_negative_bounds_are_refused(self) -> None:
        with pytest.raises(ValueError, match="negative"):
            ChatStreamAssembler(max_raw_events=-1)


class TestCompletionSummary:
    def test_full_body(self) -> None:
        body = {
            "choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
        }
        assert completion_summary(body) == CompletionSummary(10, 20, 30, "length")

    def test_zeros_stay_zero(self) -> None:
        body = {"choices": [{"index": 0, "finish_reason": "stop"}], "usage": ZERO_USAGE}
        assert completion_summary(body) == CompletionSummary(0, 0, 0, "stop")

    def test_missing_usage(self) -> None:
        body = {"choices": [{"index": 0, "finish_reason": "stop"}]}
        assert completion_summary(body) == CompletionSummary(None, None, None, "stop")

    def test_partial_usage(self) -> None:
        assert completion_summary({"usage": {"prompt_tokens": 7}}) == CompletionSummary(
            7, None, None, None
        )

    @pytest.mark.parametrize("bad", [True, False, 1.0, "3", None, [1], {"n": 1}])
    def test_only_real_ints_count(self, bad: object) -> None:
        body = {"usage": {"prompt_tokens": bad, "completion_tokens": bad, "total_tokens": bad}}
        assert completion_summary(body) == NONE_SUMMARY

    def test_choice_with_index_zero_wins_over_the_first(self) -> None:
        body = {
            "choices": [
                {"index": 1, "finish_reason": "length"},
                {"index": 0, "finish_reason": "stop"},
            ]
        }
        assert completion_summary(body).finish_reason == "stop"

    def test_first_choice_when_none_has_index_zero(self) -> None:
        body = {"choices": ["junk", {"finish_reason": "content_filter"}, {"finish_reason": "stop"}]}
        assert completion_summary(body).finish_reason == "content_filter"

    def test_index_true_is_not_index_zero_or_one(self) -> None:
        body = {
            "choices": [{"index": True, "finish_reason": "a"}, {"index": 0, "finish_reason": "b"}]
        }
        assert completion_summary(body).finish_reason == "b"

    def test_non_string_finish_reason(self) -> None:
        assert completion_summary({"choices": [{"finish_reason": 3}]}).finish_reason is None

    @pytest.mark.parametrize(
        "body",
        [
            None,
            "text",
            42,
            [],
            [{"usage": ZERO_USAGE}],
            {},
            {"usage": "x", "choices": "y"},
            {"usage": [1, 2], "choices": [None, 3]},
            {"choices": []},
        ],
    )
    def test_garbage_gives_all_none(self, body: object) -> None:
        assert completion_summary(body) == NONE_SUMMARY


# --- property tests ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(max_size=200),
    arguments=st.text(max_size=100),
    data=st.data(),
)
def test_any_split_of_content_and_arguments_reassembles(
    text: str, arguments: str, data: st.DataObject
) -> None:
    def pieces(value: str) -> list[str]:
        cuts = sorted(data.draw(st.lists(st.integers(0, len(value)), max_size=10)))
        bounds = [0, *cuts, len(value)]
        return [value[a:b] for a, b in itertools.pairwise(bounds)]

    items: list[dict[str, Any] | str] = [chunk(delta(role="assistant"))]
    items += [chunk(delta(content=p)) for p in pieces(text)]
    items.append(
        chunk(delta(tool_calls=[tool_delta(0, id="c", type="function", function={"name": "f"})]))
    )
    items += [
        chunk(delta(tool_calls=[tool_delta(0, function={"arguments": p})]))
        for p in pieces(arguments)
    ]
    items.append(chunk(delta(finish_reason="tool_calls")))
    result = assemble(*items)
    assert result.completion is not None
    message = result.completion["choices"][0]["message"]
    assert message["content"] == text
    assert message["tool_calls"][0]["function"]["arguments"] == arguments


def test_text_past_max_text_chars_is_not_kept_but_usage_and_finish_still_are() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 400, "total_tokens": 403}
    items: list[dict[str, Any] | str] = [chunk(delta(role="assistant"))]
    items += [chunk(delta(content="abcd")) for _ in range(100)]
    items += [chunk(delta(finish_reason="length")), chunk(usage=usage), "[DONE]"]
    result = assemble(*items, max_text_chars=10)
    assert result.text_truncated
    assert result.completion is not None
    assert result.completion["choices"][0]["message"]["content"] == "abcdabcd"
    assert result.completion["choices"][0]["finish_reason"] == "length"
    assert result.summary == CompletionSummary(3, 400, 403, "length")
    untouched = assemble(*items)
    assert not untouched.text_truncated
    assert untouched.completion is not None
    assert untouched.completion["choices"][0]["message"]["content"] == "abcd" * 100


def test_max_text_chars_bounds_tool_arguments_and_reasoning_too() -> None:
    items: list[dict[str, Any] | str] = [
        chunk(delta(reasoning_content="think " * 5)),
        chunk(
            delta(
                tool_calls=[
                    tool_delta(
                        0, id="c1", type="function", function={"name": "f", "arguments": "x" * 50}
                    )
                ]
            )
        ),
    ]
    result = assemble(*items, max_text_chars=40)
    assert result.text_truncated
    assert result.completion is not None
    message = result.completion["choices"][0]["message"]
    assert message["reasoning_content"] == "think " * 5
    assert message["tool_calls"][0]["function"]["arguments"] == ""


def test_parser_and_assembler_are_public_api() -> None:
    import aiohttp_session_store as package

    assert {"SSEParser", "SSEEvent", "ChatStreamAssembler", "completion_summary"} <= set(
        package.__all__
    )
    parser, assembler = package.SSEParser(), package.ChatStreamAssembler()
    stream = (
        b'data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": '
        b'{"content": "Hi"}, "finish_reason": "stop"}]}\n\ndata: [DONE]\n\n'
    )
    for event in parser.feed(stream):
        assembler.feed(event)
    reply = assembler.result()
    assert reply.done
    assert assembler.content == "Hi"
    assert reply.summary.finish_reason == "stop"


def _peak_while_assembling(event: bytes, total: int, limit: int) -> tuple[int, AssembledStream]:
    """Peak traced bytes while `total` bytes of `event` repeated stream through a parser
    and an assembler bounded as the capture bounds them (both made inside the trace)."""
    tracemalloc.start()
    try:
        parser = SSEParser(max_event_bytes=max(limit, 64 * 1024))
        assembler = ChatStreamAssembler(max_raw_bytes=limit, max_text_chars=limit)
        for _ in range(total // len(event)):
            for parsed in parser.feed(event):
                assembler.feed(parsed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, assembler.result()


def logprobs_event(token: str, alternatives: int) -> bytes:
    top = [{"token": f"t{i}", "logprob": -1.25, "bytes": [116]} for i in range(alternatives)]
    entry = {"token": token, "logprob": -0.5, "bytes": [120], "top_logprobs": top}
    choice = {**delta(content="x"), "logprobs": {"content": [entry]}}
    return f"data: {json.dumps(chunk(choice))}\n\n".encode()


def test_logprobs_count_against_the_budget_of_a_44_mib_stream() -> None:
    # One character of content per event: only the logprobs can exhaust the budget. Large
    # tokens keep the event count (and the test's time under tracemalloc) low.
    limit = 1 << 20
    peak, result = _peak_while_assembling(logprobs_event("y" * 60_000, 0), 44 << 20, limit)
    assert peak < 4 * limit, f"{peak / 2**20:.1f} MiB held for a {limit >> 20} MiB bound"
    assert result.text_truncated  # marked: the stored reply says it was cut
    assert result.completion is not None
    choice = result.completion["choices"][0]
    assert 0 < len(choice["logprobs"]["content"]) < 20  # a prefix of them, not all 766


def test_many_small_logprobs_stay_within_a_multiple_of_the_budget() -> None:
    limit = 64 * 1024
    peak, result = _peak_while_assembling(logprobs_event("x", 10), 4 << 20, limit)
    # Parsed logprobs take several times their JSON's size: the bound is a multiple.
    assert peak < 16 * limit, f"{peak / 2**20:.1f} MiB held for a {limit >> 10} KiB bound"
    assert result.text_truncated


def test_choices_and_tool_calls_a_stream_opens_are_bounded() -> None:
    events = [chunk(delta(index=i, content="")) for i in range(1000)]
    calls = [tool_delta(i, id=f"c{i}", function={"name": "", "arguments": ""}) for i in range(1000)]
    events.append(chunk(delta(tool_calls=calls)))
    result = assemble(*events, max_text_chars=640)
    assert result.text_truncated
    assert result.completion is not None
    assert len(result.completion["choices"]) == 10
    assert "tool_calls" not in result.completion["choices"][0]["message"]
