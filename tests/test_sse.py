"""The SSE parser, byte by byte: every WHATWG rule, every chunking, and the size guard."""

from __future__ import annotations

import itertools
import tracemalloc
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiohttp_session_store.sse import SSEEvent, SSEParser, TruncatedData


def parse(
    *chunks: bytes, max_event_bytes: int = 1 << 20, keep_cut_events: bool = False
) -> list[SSEEvent]:
    parser = SSEParser(max_event_bytes=max_event_bytes, keep_cut_events=keep_cut_events)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    return events


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# One stream using every rule: BOM, all three line endings, comments, a field without a
# colon, a value without the optional space, multi-line data, id, retry, event, a no-data
# block, a multibyte character and a trailing unterminated event.
KITCHEN_SINK = (
    b"\xef\xbb\xbf: a comment\r\n"
    b"retry: 2500\r"
    b"data: first\n"
    b"data:second\r\n"
    b"id: 7\r\n"
    b"\r\n"
    b"event: delta\n"
    b"data: caf\xc3\xa9 \xf0\x9f\x98\x80\n"
    b"\n"
    b"event: ignored-no-data\r"
    b"id: 8\r"
    b"\r"
    b"data\r"
    b"\r"
    b'data: {"a": 1}\r\n'
    b"\r\n"
    b"data: never dispatched\n"
)
KITCHEN_SINK_EVENTS = [
    SSEEvent("first\nsecond", "message", "7", 2500),
    SSEEvent("café 😀", "delta", "7", None),
    SSEEvent("", "message", "8", None),
    SSEEvent('{"a": 1}', "message", "8", None),
]


class TestRules:
    def test_one_event(self) -> None:
        assert parse(b"data: hello\n\n") == [SSEEvent("hello")]

    @pytest.mark.parametrize("eol", [b"\n", b"\r", b"\r\n"])
    def test_each_line_ending(self, eol: bytes) -> None:
        stream = b"event: e" + eol + b"data: a" + eol + b"data: b" + eol + eol
        assert parse(stream) == [SSEEvent("a\nb", "e")]

    def test_mixed_line_endings(self) -> None:
        assert parse(b"data: a\rdata: b\ndata: c\r\n\r") == [SSEEvent("a\nb\nc")]

    def test_crlf_split_between_chunks_is_one_line_break(self) -> None:
        # Read as two breaks, "data: a\r" + "\n" would dispatch "a" on its own.
        assert parse(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [SSEEvent("a\nb")]

    def test_empty_chunk_between_cr_and_lf_keeps_them_one_break(self) -> None:
        assert parse(b"data: a\r", b"", b"\n", b"data: b\r\n\r\n") == [SSEEvent("a\nb")]

    def test_cr_cr_is_a_blank_line(self) -> None:
        assert parse(b"data: a\r\r") == [SSEEvent("a")]

    def test_trailing_cr_dispatches_without_waiting_for_the_next_chunk(self) -> None:
        parser = SSEParser()
        assert parser.feed(b"data: a\n\r") == [SSEEvent("a")]
        assert parser.feed(b"\ndata: b\n\n") == [SSEEvent("b")]

    def test_lf_cr_is_two_line_breaks(self) -> None:
        assert parse(b"data: a\n\rdata: b\n\n") == [SSEEvent("a"), SSEEvent("b")]

    def test_only_cr_and_lf_break_lines(self) -> None:
        # str.splitlines would break on all of these; the event-stream grammar does not.
        value = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i"
        assert parse(b"data: " + value.encode() + b"\n\n") == [SSEEvent(value)]

    def test_comments_are_ignored(self) -> None:
        stream = b": keepalive\n\n:\ndata: x\n:data: y\n\n"
        assert parse(stream) == [SSEEvent("x")]

    def test_comment_only_block_dispatches_nothing(self) -> None:
        assert parse(b": ping\n\n: ping\r\n\r\n") == []

    @pytest.mark.parametrize(
        ("line", "data"),
        [
            (b"data: x", "x"),
            (b"data:x", "x"),
            (b"data:  x", " x"),
            (b"data: ", ""),
            (b"data:", ""),
            (b"data", ""),
            (b"data: a: b", "a: b"),
            (b"data:\tx", "\tx"),
            (b"data: x ", "x "),
        ],
    )
    def test_value_after_first_colon_loses_one_leading_space(self, line: bytes, data: str) -> None:
        assert parse(line + b"\n\n") == [SSEEvent(data)]

    def test_empty_data_lines_join_with_newlines(self) -> None:
        assert parse(b"data\ndata\n\n") == [SSEEvent("\n")]
        assert parse(b"data:\ndata: x\ndata:\n\n") == [SSEEvent("\nx\n")]

    def test_no_dispatch_without_a_data_line(self) -> None:
        assert parse(b"event: e\n\nid: 1\n\nretry: 5\n\n") == []

    def test_field_names_are_case_sensitive_and_unknown_ones_ignored(self) -> None:
        assert parse(b"Data: x\nDATA: y\nfoo: z\n data: w\n\n") == []
        assert parse(b"foo: z\ndata: x\n\n") == [SSEEvent("x")]

    def test_event_type_defaults_and_resets_after_dispatch(self) -> None:
        stream = b"event: a\ndata: 1\n\ndata: 2\n\nevent:\ndata: 3\n\n"
        assert parse(stream) == [SSEEvent("1", "a"), SSEEvent("2"), SSEEvent("3")]

    def test_event_type_resets_after_a_block_without_data(self) -> None:
        assert parse(b"event: lost\n\ndata: x\n\n") == [SSEEvent("x")]

    def test_last_field_of_a_kind_wins(self) -> None:
        assert parse(b"event: a\nevent: b\nid: 1\nid: 2\ndata: x\n\n") == [SSEEvent("x", "b", "2")]

    def test_id_persists_across_events_and_can_be_reset(self) -> None:
        stream = b"id: 1\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: 2\n\ndata: d\n\n"
        assert [e.id for e in parse(stream)] == ["1", "1", "", "2"]

    def test_id_containing_nul_is_ignored(self) -> None:
        parser = SSEParser()
        events = parser.feed(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n")
        assert [e.id for e in events] == ["1", "1"]
        assert parser.last_event_id == "1"

    def test_id_is_none_until_given(self) -> None:
        assert parse(b"data: a\n\n")[0].id is None

    def test_retry(self) -> None:
        parser = SSEParser()
        events = parser.feed(b"retry: 3000\ndata: a\n\ndata: b\n\n")
        assert events == [SSEEvent("a", retry=3000), SSEEvent("b")]
        assert parser.retry == 3000

    @pytest.mark.parametrize(
        "value",
        [b"", b"  10", b" 10 ", b"1.5", b"-1", b"+1", b"1e3", b"abc", "١٢".encode(), "²".encode()],
    )
    def test_retry_must_be_ascii_digits(self, value: bytes) -> None:
        parser = SSEParser()
        assert parser.feed(b"retry: 1\n\nretry:" + value + b"\ndata: x\n\n") == [SSEEvent("x")]
        assert parser.retry == 1

    def test_retry_with_more_digits_than_int_accepts_is_ignored(self) -> None:
        parser = SSEParser()
        assert parser.feed(b"retry: " + b"9" * 10_000 + b"\ndata: x\n\n") == [SSEEvent("x")]
        assert parser.retry is None

    def test_unterminated_event_is_discarded_at_close(self) -> None:
        parser = SSEParser()
        assert parser.feed(b"data: a\n\ndata: b\n") == [SSEEvent("a")]
        assert parser.close() == []

    def test_unterminated_line_is_discarded_at_close(self) -> None:
        assert parse(b"data: a\n\ndata: b") == [SSEEvent("a")]

    def test_parser_can_take_a_new_stream_after_close(self) -> None:
        parser = SSEParser()
        assert parser.feed(b"id: 5\ndata: half") == []
        assert parser.close() == []
        # The new stream starts clean (the old half event is gone) but keeps the last id.
        assert parser.feed(b"\xef\xbb\xbfdata: b\n\n") == [SSEEvent("b", id="5")]

    def test_accepts_bytearray_and_memoryview(self) -> None:
        parser = SSEParser()
        assert parser.feed(bytearray(b"data: a\n\n")) == [SSEEvent("a")]
        buffer = bytearray(b"data: b\n\n")
        events = parser.feed(memoryview(buffer))
        buffer[:] = b"XXXXXXXXX"  # the parser must not keep a view on the caller's buffer
        assert events == [SSEEvent("b")]

    def test_memoryview_of_a_partial_line_is_copied(self) -> None:
        parser = SSEParser()
        buffer = bytearray(b"data: ab")
        assert parser.feed(memoryview(buffer)) == []
        buffer[:] = b"XXXXXXXX"
        assert parser.feed(b"c\n\n") == [SSEEvent("abc")]

    def test_bytes_seen_counts_every_byte_fed(self) -> None:
        parser = SSEParser()
        parser.feed(b"\xef\xbb")
        parser.feed(b"\xbfdata: a\r")
        parser.feed(b"\n\n: x")
        assert parser.bytes_seen == len(b"\xef\xbb\xbfdata: a\r\n\n: x")

    def test_max_event_bytes_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="max_event_bytes"):
            SSEParser(max_event_bytes=0)


class TestBom:
    def test_leading_bom_is_dropped(self) -> None:
        assert parse(b"\xef\xbb\xbfdata: x\n\n") == [SSEEvent("x")]

    def test_bom_split_byte_by_byte(self) -> None:
        assert parse(*bytewise(b"\xef\xbb\xbfdata: x\n\n")) == [SSEEvent("x")]

    def test_only_one_bom_is_dropped(self) -> None:
        # The second one is part of the field name, which then matches nothing.
        assert parse(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\n") == []

    def test_bom_later_in_the_stream_is_content(self) -> None:
        assert parse(b"data: a\n\ndata: \xef\xbb\xbfb\n\n") == [SSEEvent("a"), SSEEvent("\ufeffb")]

    def test_an_incomplete_bom_is_not_dropped(self) -> None:
        assert parse(b"\xef\xbb", b"data: x\n\n") == []
        assert parse(b"\xef", b"\n", b"data: x\n\n") == [SSEEvent("x")]

    def test_stream_shorter_than_a_bom(self) -> None:
        assert parse(b"\n") == []
        assert parse(b"\xef\xbb") == []


class TestUtf8:
    EMOJI = "😀".encode()  # 4 bytes

    @pytest.mark.parametrize("offset", range(1, 4))
    def test_four_byte_character_split_at_each_offset(self, offset: int) -> None:
        stream = b"data: a" + self.EMOJI + b"b\n\n"
        cut = len(b"data: a") + offset
        assert parse(stream[:cut], stream[cut:]) == [SSEEvent("a😀b")]

    def test_four_byte_character_fed_byte_by_byte(self) -> None:
        assert parse(*bytewise(b"data: " + self.EMOJI * 3 + b"\n\n")) == [SSEEvent("😀😀😀")]

    @pytest.mark.parametrize(
        ("raw", "text"),
        [
            (b"\xff", "\ufffd"),
            (b"a\x80b", "a\ufffdb"),
            (b"\xc3", "\ufffd"),  # truncated two-byte sequence before the line end
            (b"\xf0\x9f\x98", "\ufffd"),  # truncated four-byte sequence
            (b"\xed\xa0\x80", "\ufffd\ufffd\ufffd"),  # an encoded surrogate is invalid
            (b"\xc0\xaf", "\ufffd\ufffd"),  # overlong encoding
        ],
    )
    def test_invalid_utf8_becomes_replacement_characters(self, raw: bytes, text: str) -> None:
        stream = b"data: " + raw + b"\n\n"
        assert parse(stream) == [SSEEvent(text)]
        assert parse(*bytewise(stream)) == [SSEEvent(text)]

    def test_invalid_utf8_in_event_and_id(self) -> None:
        assert parse(b"event: \xff\nid: \xfe\ndata: x\n\n") == [SSEEvent("x", "\ufffd", "\ufffd")]

    def test_invalid_utf8_in_a_field_name_matches_no_field(self) -> None:
        assert parse(b"d\xffata: x\n\ndata: y\n\n") == [SSEEvent("y")]


class TestChunking:
    def test_kitchen_sink_in_one_chunk(self) -> None:
        assert parse(KITCHEN_SINK) == KITCHEN_SINK_EVENTS

    def test_kitchen_sink_byte_by_byte(self) -> None:
        assert parse(*bytewise(KITCHEN_SINK)) == KITCHEN_SINK_EVENTS

    def test_kitchen_sink_split_at_every_offset(self) -> None:
        for cut in range(len(KITCHEN_SINK) + 1):
            assert parse(KITCHEN_SINK[:cut], KITCHEN_SINK[cut:]) == KITCHEN_SINK_EVENTS, cut

    def test_short_stream_split_at_every_pair_of_offsets(self) -> None:
        stream = b"\xef\xbb\xbfid: 1\r\ndata: \xc3\xa9\r\r: c\ndata: b\r\n\r\n"
        expected = [SSEEvent("é", id="1"), SSEEvent("b", id="1")]
        assert parse(stream) == expected
        for i, j in itertools.combinations_with_replacement(range(len(stream) + 1), 2):
            assert parse(stream[:i], stream[i:j], stream[j:]) == expected, (i, j)

    def test_events_come_out_of_the_chunk_that_completes_them(self) -> None:
        parser = SSEParser()
        assert parser.feed(b"data: a\n") == []
        assert parser.feed(b"\ndata: b\n\ndata: c") == [SSEEvent("a"), SSEEvent("b")]
        assert parser.feed(b"\n") == []
        assert parser.feed(b"\n") == [SSEEvent("c")]


class TestSizeGuard:
    def test_event_at_the_limit_passes_one_over_overflows(self) -> None:
        line = b"data: " + b"x" * 94  # 100 bytes
        parser = SSEParser(max_event_bytes=100)
        assert parser.feed(line + b"\n\n") == [SSEEvent("x" * 94)]
        assert not parser.overflowed
        assert parser.feed(line + b"y\n\n") == []
        assert parser.overflowed

    def test_oversized_line_in_pieces_is_dropped_and_the_next_event_parsed(self) -> None:
        parser = SSEParser(max_event_bytes=100)
        events = parser.feed(b"data: " + b"x" * 60)
        events += parser.feed(b"x" * 60)
        events += parser.feed(b"x" * 60 + b"\ndata: still the dropped event\n\n")
        events += parser.feed(b"data: next\n\n")
        assert events == [SSEEvent("next")]
        assert parser.overflowed

    def test_line_break_right_after_an_overflowed_piece_is_not_a_blank_line(self) -> None:
        # The overflowed line's bytes are gone, but its end must not pass for a blank line,
        # or the rest of the oversized event would be parsed as an event of its own.
        parser = SSEParser(max_event_bytes=100)
        events = parser.feed(b"data: " + b"x" * 200)
        events += parser.feed(b"\ndata: rest of the dropped event\n\n")
        events += parser.feed(b"data: next\n\n")
        assert events == [SSEEvent("next")]

    def test_oversized_line_byte_by_byte(self) -> None:
        stream = b"data: " + b"x" * 50 + b"\r\n\r\n" + b"data: ok\r\n\r\n"
        assert parse(*bytewise(stream), max_event_bytes=20) == [SSEEvent("ok")]

    def test_many_lines_adding_up_over_the_limit(self) -> None:
        parser = SSEParser(max_event_bytes=100)
        stream = b"data: 123456789\n" * 20 + b"\ndata: after\n\n"
        assert parser.feed(stream) == [SSEEvent("after")]
        assert parser.overflowed

    def test_overflow_cut_short_by_a_blank_line_in_the_same_chunk(self) -> None:
        stream = b"data: " + b"x" * 200 + b"\n\ndata: a\n\ndata: b\n\n"
        assert parse(stream, max_event_bytes=100) == [SSEEvent("a"), SSEEvent("b")]

    def test_overflowed_partial_line_ending_in_cr(self) -> None:
        chunks = [b"data: " + b"x" * 200, b"x\r", b"\n", b"\r\n", b"data: a\r\n\r\n"]
        assert parse(*chunks, max_event_bytes=100) == [SSEEvent("a")]

    def test_long_comments_do_not_count(self) -> None:
        parser = SSEParser(max_event_bytes=100)
        events = parser.feed(b"data: a\n: " + b"c" * 500)
        events += parser.feed(b"c" * 500 + b"\n\n")
        assert events == [SSEEvent("a")]
        assert not parser.overflowed

    def test_overflowed_stays_set(self) -> None:
        parser = SSEParser(max_event_bytes=10)
        parser.feed(b"data: " + b"x" * 20 + b"\n\n")
        assert parser.feed(b"data: y\n\n") == [SSEEvent("y")]
        assert parser.overflowed

    def test_memory_stays_bounded_for_an_endless_line(self) -> None:
        parser = SSEParser(max_event_bytes=64 * 1024)
        piece = b"x" * (64 * 1024)
        tracemalloc.start()
        try:
            parser.feed(b"data: ")
            for _ in range(320):  # 20 MiB in one line
                parser.feed(piece)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert parser.overflowed
        assert peak < 1024 * 1024, peak
        assert parser.feed(b"\n\ndata: ok\n\n") == [SSEEvent("ok")]


# --- property tests ---------------------------------------------------------------------

_TEXT = st.text(
    # codec="utf-8" leaves out lone surrogates, which no byte stream can carry.
    alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"),
    max_size=20,
)


class TestKeepCutEvents:
    """For a recorder: an oversized event is kept as a marked prefix, never dropped."""

    def test_oversized_event_comes_out_cut_and_marked_in_any_chunking(self) -> None:
        stream = b"id: 7\ndata: " + b"x" * 200 + b"\ndata: more\n\ndata: next\n\n"
        # 100 bytes: "id: 7" (5) leaves 95 for the data line, "data: " and 89 x.
        expected = [SSEEvent("x" * 89, id="7", truncated=True), SSEEvent("next", id="7")]
        assert parse(stream, max_event_bytes=100, keep_cut_events=True) == expected
        assert parse(*bytewise(stream), max_event_bytes=100, keep_cut_events=True) == expected
        for i in range(0, len(stream), 7):
            parts = (stream[:i], stream[i:])
            assert parse(*parts, max_event_bytes=100, keep_cut_events=True) == expected, i

    def test_lines_adding_up_over_the_limit_keep_the_ones_that_fit(self) -> None:
        stream = b"data: 123456789\n" * 20 + b"\n"
        (event,) = parse(stream, max_event_bytes=50, keep_cut_events=True)
        # Three whole lines (45 bytes), then 5 bytes of the fourth: "data:" and no value.
        assert event == SSEEvent("123456789\n123456789\n123456789\n", truncated=True)

    def test_a_character_split_by_the_cut_is_left_out(self) -> None:
        stream = b"data: " + "é".encode() * 100 + b"\n\n"
        (event,) = parse(stream, max_event_bytes=11, keep_cut_events=True)
        assert event == SSEEvent("éé", truncated=True)  # 6 + 4 bytes; the 11th is half an é

    def test_an_unterminated_oversized_event_is_still_discarded(self) -> None:
        parser = SSEParser(max_event_bytes=10, keep_cut_events=True)
        assert parser.feed(b"data: " + b"x" * 50) == []
        assert parser.close() == []
        assert parser.overflowed


@dataclass(frozen=True)
class _Spec:
    data: list[str]
    event: str | None
    id: str | None
    retry: int | None
    comment: str | None


_SPECS = st.builds(
    _Spec,
    data=st.lists(_TEXT, max_size=4),
    event=st.none() | _TEXT,
    id=st.none() | _TEXT,
    retry=st.none() | st.integers(0, 10**12),
    comment=st.none() | _TEXT,
)


def _serialise(specs: list[_Spec], bom: bool) -> tuple[list[str], list[SSEEvent]]:
    """The lines of a stream (no terminators) and the events a parser must get from it."""
    lines: list[str] = []
    expected: list[SSEEvent] = []
    last_id: str | None = None
    for spec in specs:
        if spec.comment is not None:
            lines.append(":" + spec.comment)
        if spec.event is not None:
            lines.append("event: " + spec.event)
        if spec.id is not None:
            lines.append("id: " + spec.id)
            if "\x00" not in spec.id:
                last_id = spec.id
        if spec.retry is not None:
            lines.append(f"retry: {spec.retry}")
        lines.extend("data: " + d for d in spec.data)
        lines.append("")
        if spec.data:
            expected.append(
                SSEEvent("\n".join(spec.data), spec.event or "message", last_id, spec.retry)
            )
    if bom:
        lines[0] = "\ufeff" + lines[0]
    return lines, expected


def _join(lines: list[str], endings: list[str]) -> bytes:
    out: list[str] = []
    previous = ""
    for line, eol in zip(lines, itertools.cycle(endings)):
        if previous == "\r" and not line and eol == "\n":
            eol = "\r\n"  # CR then LF would be one break, not the blank line meant here
        out.append(line + eol)
        previous = eol
    return "".join(out).encode()


@settings(max_examples=300, deadline=None)
@given(
    specs=st.lists(_SPECS, min_size=1, max_size=6),
    bom=st.booleans(),
    endings=st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=1, max_size=5),
    data=st.data(),
)
def test_any_split_gives_the_events_of_one_feed(
    specs: list[_Spec], bom: bool, endings: list[str], data: st.DataObject
) -> None:
    lines, expected = _serialise(specs, bom)
    stream = _join(lines, endings)
    assert parse(stream) == expected
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert parse(*split_at(stream, cuts)) == expected


@settings(max_examples=100, deadline=None)
@given(specs=st.lists(_SPECS, min_size=1, max_size=4), eol=st.sampled_from(["\n", "\r", "\r\n"]))
def test_byte_by_byte_equals_one_feed(specs: list[_Spec], eol: str) -> None:
    lines, expected = _serialise(specs, bom=False)
    stream = _join(lines, [eol])
    assert parse(*bytewise(stream)) == parse(stream) == expected


@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=200), data=st.data())
def test_arbitrary_bytes_never_raise_and_split_invariantly(
    stream: bytes, data: st.DataObject
) -> None:
    whole = parse(stream, max_event_bytes=64)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    assert parse(*split_at(stream, cuts), max_event_bytes=64) == whole


def parse_data(
    *chunks: bytes, max_event_bytes: int = 1 << 20, keep_cut_events: bool = False
) -> list[tuple[str, bool]]:
    parser = SSEParser(max_event_bytes=max_event_bytes, keep_cut_events=keep_cut_events)
    found: list[str] = []
    for chunk in chunks:
        found += parser.feed_data(chunk)
    return [(str(d), isinstance(d, TruncatedData)) for d in found]


@settings(max_examples=300, deadline=None)
@given(
    specs=st.lists(_SPECS, min_size=1, max_size=6),
    endings=st.lists(st.sampled_from(["\n", "\r", "\r\n"]), min_size=1, max_size=3),
    limit=st.sampled_from([16, 64, 1 << 20]),
    keep_cut_events=st.booleans(),
    data=st.data(),
)
def test_feed_data_gives_the_data_of_feed_in_any_split(
    specs: list[_Spec],
    endings: list[str],
    limit: int,
    keep_cut_events: bool,
    data: st.DataObject,
) -> None:
    lines, _ = _serialise(specs, bom=False)
    stream = _join(lines, endings)
    events = parse(stream, max_event_bytes=limit, keep_cut_events=keep_cut_events)
    expected = [(e.data, e.truncated) for e in events]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    chunks = split_at(stream, cuts)
    assert parse_data(*chunks, max_event_bytes=limit, keep_cut_events=keep_cut_events) == expected
    # One event per write, as proxies send them: the fast path's case.
    writes = [e + b"\n\n" for e in stream.split(b"\n\n") if e]
    one_each = parse_data(*writes, max_event_bytes=limit, keep_cut_events=keep_cut_events)
    whole = parse_data(b"".join(writes), max_event_bytes=limit, keep_cut_events=keep_cut_events)
    assert one_each == whole


def test_feed_data_fast_path_keeps_the_state_of_an_event_without_data() -> None:
    parser = SSEParser()
    assert parser.feed_data(b"event: x\nretry: 5\n\n") == []
    assert parser.feed_data(b"data: a\n\n") == ["a"]
    assert parser.feed(b"data: b\n\n") == [SSEEvent("b", retry=None)]
    assert parser.retry == 5
