"""The tee's bulk path (batches split at once, repeated chunks merged by runs) against the
event-by-event path (`SSEParser.feed_data` into `ChatStreamAssembler.feed_data`).

Streams are built to hit what the bulk path has to get exactly right: chunks that repeat
but for their text (with quotes, backslashes, escapes, control characters, lone
surrogates, the separator the runs use), lines that begin or end like a repeat and are
not one, other fields and comments, CRLF and CR, a BOM, events over the size limit, raw
bytes that are not UTF-8, and every way of cutting the bytes into writes.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiohttp_session_store.assembler import AssembledStream, ChatStreamAssembler
from aiohttp_session_store.capture import ResponseCapture
from aiohttp_session_store.sse import SSEParser, split_data_events

HEAD = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 7, "model": "m"}

texts = st.one_of(
    st.text(max_size=12),
    st.text(alphabet='ab"\\/\n\x04\x00 é😀\u2028', max_size=10),
    st.sampled_from(["", "@", "@@", "content", "m", "\ud800", "a\\", '"', "chatcmpl-9"]),
)


def _dump(obj: Any, style: int) -> bytes:
    if style == 0:
        return json.dumps(obj).encode()
    if style == 1:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if style == 2:
        try:
            return orjson.dumps(obj)
        except TypeError:  # lone surrogates: orjson refuses them
            return json.dumps(obj, separators=(",", ":")).encode()
    return json.dumps(obj, separators=(",", ":")).encode()


@st.composite
def shapes(draw: st.DrawFn) -> tuple[int, int, str, Any, bool, bool]:
    """How a stream writes its text chunks: the rest of a chunk, all but the text."""
    return (
        draw(st.integers(0, 3)),  # serializer
        draw(st.sampled_from([0, 0, 0, 1])),  # choice index
        draw(st.sampled_from(["content", "content", "reasoning_content", "reasoning", "refusal"])),
        draw(st.sampled_from([False, "assistant", "", None])),  # role
        draw(st.booleans()),  # another text field, null
        draw(st.booleans()),  # finish_reason: null
    )


def text_chunk(shape: tuple[int, int, str, Any, bool, bool], text: str) -> bytes:
    style, index, key, role, other, finish = shape
    delta: dict[str, Any] = {key: text}
    if role is not False:
        delta["role"] = role
    if other:
        delta["refusal" if key == "content" else "content"] = None
    choice: dict[str, Any] = {"index": index, "delta": delta}
    if finish:
        choice["finish_reason"] = None
    return _dump({**HEAD, "choices": [choice]}, style)


@st.composite
def payloads(draw: st.DrawFn, shape: Any = None) -> bytes:
    """The data of one event, most often a chat chunk (of `shape`'s, when given)."""
    kind = draw(st.integers(0, 12 if shape is None else 18))
    style = draw(st.integers(0, 3))
    text = draw(texts)
    if kind <= 5 or kind > 12:
        return text_chunk(shape or draw(shapes()), text)
    if kind == 6:  # like a repeat with something changed around the text
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": "stop"}
        return _dump({**HEAD, "choices": [choice]}, style)
    if kind == 7:
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        return _dump({**HEAD, "choices": [], "usage": usage}, style)
    if kind == 8:  # a chunk's bytes with its text's quotes broken
        good = _dump({**HEAD, "choices": [{"index": 0, "delta": {"content": "x"}}]}, 3)
        return good.replace(
            b'"x"', draw(st.sampled_from([b'"a"b"', b'"a\\"', b'"\x04"', b'"\x01"']))
        )
    if kind == 9:
        return b"[DONE]"
    if kind == 10:
        return draw(st.binary(max_size=8)).replace(b"\n", b"").replace(b"\r", b"")
    if kind == 11:
        return _dump({"error": {"message": text}}, style)
    tool = {"index": 0, "id": "t", "function": {"name": "f", "arguments": text}}
    return _dump({**HEAD, "choices": [{"index": 0, "delta": {"tool_calls": [tool]}}]}, style)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int], int]:
    shape = draw(shapes())
    events = draw(st.lists(payloads(shape), max_size=24))
    crlf = draw(st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"]))
    parts = [
        draw(st.sampled_from([b"", b"", b": ping" + crlf, b"event: x" + crlf, b"id: 1" + crlf]))
        + b"data: "
        + event
        + crlf
        + crlf
        for event in events
    ]
    if draw(st.integers(0, 8)) == 0:
        parts.insert(0, b"\xef\xbb\xbf")
    if draw(st.integers(0, 8)) == 0:
        parts.append(b"data: unfinished")
    data = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    limit = draw(st.sampled_from([1 << 20, 300, 60]))
    return data, cuts, limit


def reference(data: bytes, cuts: list[int], limit: int) -> tuple[AssembledStream, bool]:
    """What the tee assembled event by event, as it did before the bulk path."""
    parser = SSEParser(max_event_bytes=max(limit, 64 * 1024), keep_cut_events=True)
    assembler = ChatStreamAssembler(max_raw_bytes=limit, max_text_chars=limit)
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        for event in parser.feed_data(data[start:end]):
            assembler.feed_data(event)
    return assembler.result(), parser.overflowed


def bulk(data: bytes, cuts: list[int], limit: int) -> tuple[AssembledStream, bool]:
    capture = ResponseCapture(limit=limit, sse=True)
    for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
        capture.feed(data[start:end])
    capture.result()
    assembler = capture._assembler
    assert assembler is not None
    parser = capture._parser
    return assembler.result(), parser is not None and parser.overflowed


@settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_the_bulk_path_assembles_what_the_event_path_does(
    stream: tuple[bytes, list[int], int],
) -> None:
    assert bulk(*stream) == reference(*stream)


@settings(max_examples=300, deadline=None)
@given(
    shapes().flatmap(lambda shape: st.lists(payloads(shape), max_size=24)),
    st.sampled_from([1 << 20, 400, 50]),
)
def test_feed_payloads_is_feed_data_for_each(events: list[bytes], limit: int) -> None:
    one = ChatStreamAssembler(max_raw_bytes=limit, max_text_chars=limit, max_raw_events=12)
    for event in events:
        one.feed_data(event.decode("utf-8", "replace"))
    many = ChatStreamAssembler(max_raw_bytes=limit, max_text_chars=limit, max_raw_events=12)
    half = len(events) // 2
    many.feed_payloads(events[:half])
    many.feed_payloads(events[half:])
    assert many.result() == one.result()


def test_a_long_reply_of_repeats_is_one_run_and_the_same_text() -> None:
    pieces = [f'w{i} "q" \\ é\n' for i in range(3000)]
    frames = [
        b"data: " + text_chunk((0, 0, "content", False, False, True), piece) + b"\n\n"
        for piece in pieces
    ]
    capture = ResponseCapture(limit=1 << 22, sse=True)
    for frame in frames:
        capture.feed(frame)
    body = capture.result()
    assert body.content == "".join(pieces)
    assert not body.truncated
    # Held unsplit at any time: at most one batch.
    assert capture._batch_bytes <= 64 * 1024


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"data: a\n\ndata: b\n\n", ([b"a", b"b"], b"")),
        (b"data: a\r\n\r\ndata: b", ([b"a"], b"data: b")),
        (b"data: a", ([], b"data: a")),
        (b"data: a\ndata: b\n\n", None),  # two data lines: the parser joins them
        (b"data:a\n\n", None),
        (b": c\n\ndata: a\n\n", None),
        (b"data: a\r\rdata: b\n\n", None),
        (b"\xef\xbb\xbfdata: a\n\n", None),
        (b"data: a\n\n\n", None),
    ],
)
def test_split_data_events(data: bytes, expected: tuple[list[bytes], bytes] | None) -> None:
    assert split_data_events(data, 1024) == expected


def test_split_data_events_leaves_an_oversized_event_to_the_parser() -> None:
    data = b"data: " + b"x" * 100 + b"\n\n"
    assert split_data_events(data, 106) is not None
    assert split_data_events(data, 105) is None


@pytest.mark.parametrize(
    "tokens",
    [
        [b'"a\\"', b'",""'],  # two broken strings that parse as two strings once joined
        [b'"a","b"', b'"c'],
        [b'"a\\\\"', b'"b\\\\\\"'],
        [b'"\x04"', b'"x"'],
        [b'"\\ud800"', b'"x"'],
    ],
)
def test_lines_that_only_look_like_repeats_are_not_merged_as_such(tokens: list[bytes]) -> None:
    known = {**HEAD, "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
    prefix, suffix = json.dumps(known).encode().split(b'"x"')
    first = {**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    events = [json.dumps(first).encode(), json.dumps(known).encode()]
    events += [prefix + token + suffix for token in tokens]
    one = ChatStreamAssembler()
    for event in events:
        one.feed_data(event.decode("utf-8", "replace"))
    many = ChatStreamAssembler()
    many.feed_payloads(events)
    assert many.result() == one.result()
