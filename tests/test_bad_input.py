"""Hostile and malformed input: never a 500 from the middleware, always recorded, never fatal.

A corpus of bad requests, each sent to a fresh recorded app and followed by a normal one;
then property tests (hypothesis) for session id derivation (hashing.py) and for the
stream tee: any split of a handler's writes gives the same stored record. The SSE parser's
own split-invariance properties live in tests/test_sse.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import json
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from aiohttp_session_store import InvalidSessionIdError, SessionStore, get_session, setup
from aiohttp_session_store.capture import ResponseCapture
from aiohttp_session_store.hashing import (
    first_user_text,
    generate_session_id,
    scoped_session_id,
    validate_session_id,
)
from aiohttp_session_store.sse import SSEParser

PATH = "/v1/chat/completions"
LIMIT = 1024 * 1024  # StoreConfig.max_body_bytes, the default
Client = TestClient[web.Request, web.Application]


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def chat(text: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


@dataclass(frozen=True)
class Bad:
    name: str
    data: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Header lines sent as raw bytes (a client library would refuse them).
    raw_headers: tuple[bytes, ...] = ()
    method: str = "POST"
    statuses: frozenset[int] = frozenset({200})
    client_max_size: int | None = None
    #: False when the body is refused before it can be read (too large, undecodable).
    body_read: bool = True


HELLO = body(chat("hello"))
TWO_MB = "x" * (2 * 1024 * 1024)

CORPUS = [
    # -- not JSON, or not an object
    Bad("invalid_json", b'{"messages": [{"role": "user", "content": "hi"'),
    Bad("empty_body", b""),
    Bad("json_array", body([{"role": "user", "content": "hi"}])),
    Bad("json_string", body("hello")),
    Bad("json_number", b"42"),
    Bad("json_null", b"null"),
    Bad("json_true", b"true"),
    Bad(
        "form_encoded",
        b"messages=hi&model=m",
        {"Content-Type": "application/x-www-form-urlencoded"},
    ),
    Bad("utf16_json", json.dumps(chat("hello")).encode("utf-16")),
    Bad("bom_prefixed_json", b"\xef\xbb\xbf" + HELLO),
    Bad("trailing_garbage", HELLO + b"}}}"),
    # -- messages missing, empty, or the wrong type
    Bad("no_messages", body({"model": "m"})),
    Bad("messages_empty", body({"messages": []})),
    Bad("messages_string", body({"messages": "hi"})),
    Bad("messages_object", body({"messages": {"role": "user", "content": "hi"}})),
    Bad("messages_null", body({"messages": None})),
    Bad("messages_of_numbers", body({"messages": [1, 2.5, -3]})),
    Bad("messages_of_nulls", body({"messages": [None, None]})),
    Bad("messages_of_arrays", body({"messages": [["user", "hi"]]})),
    Bad("role_number", body({"messages": [{"role": 1, "content": "hi"}]})),
    Bad("role_missing", body({"messages": [{"content": "hi"}]})),
    # -- content of every wrong kind
    Bad("content_number", body(chat(42))),
    Bad("content_null", body(chat(None))),
    Bad("content_object", body(chat({"text": "hi"}))),
    Bad("content_bool", body(chat(True))),
    Bad("content_empty", body(chat(""))),
    Bad(
        "content_parts_garbage",
        body(chat([{"type": "text", "text": 5}, 7, None, {"type": "image_url"}, {"type": "text"}])),
    ),
    Bad(
        "wrong_types_everywhere",
        body(
            {
                "model": 5,
                "stream": "yes",
                "temperature": "hot",
                "stream_options": [1],
                "tools": "none",
                "messages": [{"role": "user", "content": "hi", "name": 3}],
            }
        ),
    ),
    Bad("nan_and_infinity", b'{"model": NaN, "temperature": -Infinity, "messages": []}'),
    Bad("integer_of_5000_digits", b'{"max_tokens": ' + b"9" * 5000 + b', "messages": []}'),
    Bad("duplicate_keys", b'{"messages": [], "messages": [{"role": "user", "content": "dup"}]}'),
    # -- size and depth
    Bad(
        "content_2mb_over_client_max_size",
        body(chat(TWO_MB)),
        statuses=frozenset({413}),
        body_read=False,
    ),
    Bad("content_2mb_accepted", body(chat(TWO_MB)), client_max_size=8 * 1024 * 1024),
    Bad(
        "messages_10000",
        body({"messages": [{"role": "user", "content": f"m{i}"} for i in range(10_000)]}),
    ),
    Bad("nesting_10000_deep", b"[" * 10_000 + b"]" * 10_000),
    Bad(
        "content_nested_10000_deep",
        b'{"messages": [{"role": "user", "content": ' + b"[" * 10_000 + b"]" * 10_000 + b"}]}",
    ),
    Bad(
        "content_nested_500_deep",
        b'{"messages": [{"role": "user", "content": ' + b"[" * 500 + b"]" * 500 + b"}]}",
    ),
    Bad("huge_headers", HELLO, {f"X-Pad-{i}": "p" * 8000 for i in range(100)}),
    # -- encodings and control characters
    Bad("invalid_utf8", b'{"messages": [{"role": "user", "content": "\xff\xfe\xfa"}]}'),
    Bad("raw_nul_bytes", b'{"messages": [{"role": "user", "content": "a\x00b"}]}\x00\x00'),
    Bad("escaped_nul", body(chat("a\u0000b"))),
    Bad("lone_surrogate_content", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    Bad("lone_surrogate_model", b'{"model": "\\udfff", "messages": []}'),
    Bad(
        "gzip_that_is_not",
        b"certainly not gzip",
        # Connection: close because aiohttp itself, draining the unread body after any
        # reply, hits the decoding error again and drops a kept-alive connection.
        {"Content-Encoding": "gzip", "Connection": "close"},
        statuses=frozenset({400}),  # the client's body cannot be decoded
        body_read=False,
    ),
    Bad("get_instead_of_post", None, method="GET", statuses=frozenset({405})),
    # -- hostile session headers
    Bad("session_id_129_chars", HELLO, {"X-Session-Id": "a" * 129}, statuses=frozenset({400})),
    Bad("session_id_empty", HELLO, {"X-Session-Id": ""}, statuses=frozenset({400})),
    Bad("session_id_spaces", HELLO, {"X-Session-Id": "a b"}, statuses=frozenset({400})),
    Bad(
        "session_id_sql",
        HELLO,
        {"X-Session-Id": "x'; DROP TABLE sessions; --"},
        statuses=frozenset({400}),
    ),
    Bad("session_id_path", HELLO, {"X-Session-Id": "../../etc/passwd"}, statuses=frozenset({400})),
    Bad("session_id_percent", HELLO, {"X-Session-Id": "%00%ff"}, statuses=frozenset({400})),
    Bad(
        "session_id_utf8",
        HELLO,
        raw_headers=(b"X-Session-Id: \xc3\xa9t\xc3\xa9",),
        statuses=frozenset({400}),
    ),
    Bad(
        "session_id_not_utf8",
        HELLO,
        raw_headers=(b"X-Session-Id: \xff\xfe",),
        statuses=frozenset({400}),
    ),
    Bad("other_header_not_utf8", HELLO, raw_headers=(b"X-Note: caf\xe9 \xff",)),
]


async def echo_session(request: web.Request) -> web.Response:
    """A handler that cannot fail: any 500 would be the middleware's."""
    session = get_session(request)
    return web.json_response({"session_id": session.id if session else None})


async def raw_post(client: Client, bad: Bad, data: bytes) -> int:
    """Send a request with header bytes no client library would send; its status."""
    assert client.server.host is not None
    assert client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        head = (
            f"POST {PATH} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\nX-Corpus: {bad.name}\r\n"
        ).encode()
        writer.write(head + b"".join(h + b"\r\n" for h in bad.raw_headers) + b"\r\n" + data)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        await reader.read()  # Connection: close: the server ends it after the reply
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1])


async def send(client: Client, bad: Bad) -> int:
    if bad.raw_headers:
        return await raw_post(client, bad, bad.data or b"")
    headers = {"X-Corpus": bad.name, **bad.headers}
    if bad.data is not None and "Content-Type" not in headers:
        headers["Content-Type"] = "application/json"
    # A file-like body: aiohttp warns (an error here) about sending megabytes of raw bytes.
    data = io.BytesIO(bad.data) if bad.data is not None else None
    async with client.request(bad.method, PATH, data=data, headers=headers) as resp:
        await resp.read()
        return resp.status


async def committed(store: SessionStore) -> bool:
    """Whether everything queued was committed within 1.5 s.

    Asserted by the caller outside any `except`: a failure report chaining asyncio's
    CancelledError into TimeoutError made pytest crash on CPython 3.11.7 (SystemError: AST
    constructor recursion depth mismatch), hiding every result.
    """
    try:
        await asyncio.wait_for(store.flush(), 1.5)
    except asyncio.TimeoutError:
        return False
    return True


def test_corpus_is_large_and_names_are_unique() -> None:
    assert len(CORPUS) >= 30
    assert len({bad.name for bad in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("bad", CORPUS, ids=lambda bad: bad.name)
async def test_bad_request_is_answered_recorded_and_harmless(
    aiohttp_client: AiohttpClient, tmp_path: Path, bad: Bad
) -> None:
    db = tmp_path / "sessions.db"
    app = web.Application(client_max_size=bad.client_max_size or 1024**2)
    store = setup(app, db)
    app.router.add_post(PATH, echo_session)
    client = await aiohttp_client(app)
    # Only so a failing case fails fast: closing would otherwise retry for 10 s.
    store.manager.writer._close_timeout = 0.5

    status = await send(client, bad)
    assert status != 500
    assert status in bad.statuses

    # The next normal request is served and keyed as usual.
    text = f"normal after {bad.name}"
    async with client.post(PATH, json=chat(text)) as resp:
        assert resp.status == 200
        assert (await resp.json())["session_id"] == generate_session_id(text)

    writer = store.manager.writer
    assert await committed(store), f"records never committed: {writer.write_errors} failed commits"
    assert writer.write_errors == 0
    assert writer.records_dropped == 0

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        found = conn.execute(
            "SELECT q.openai_request, q.headers, r.status_code, r.outcome"
            " FROM requests q JOIN responses r USING (request_id)"
            """ WHERE json_extract(q.headers, '$."X-Corpus"') = ?""",
            (bad.name,),
        ).fetchall()
        normal = conn.execute(
            "SELECT count(*) FROM requests q JOIN responses r USING (request_id)"
            " WHERE q.session_id = ?",
            (generate_session_id(text),),
        ).fetchone()[0]
    finally:
        conn.close()
    assert len(found) == 1, f"{len(found)} recorded calls"
    (row,) = found
    assert row["status_code"] == status
    assert normal == 1

    stored = row["openai_request"]
    sent = bad.data or b""
    if not bad.body_read:
        assert stored is None  # the body was refused unread
    elif len(sent) > LIMIT:
        envelope = json.loads(stored)
        assert envelope["truncated"] is True
        assert envelope["original_bytes"] == len(sent)
        assert len(envelope["prefix"]) <= LIMIT
    else:
        assert stored is not None


async def test_reply_with_a_lone_surrogate_is_recorded(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    # An upstream can stream JSON with "\ud800" in it as easily as a client can send it.
    async def odd_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(
            b'data: {"object": "chat.completion.chunk", "choices": [{"index": 0,'
            b' "delta": {"content": "odd \\ud800 text"}, "finish_reason": "stop"}]}\n\n'
        )
        await response.write_eof()
        return response

    db = tmp_path / "sessions.db"
    app = web.Application()
    store = setup(app, db)
    app.router.add_post(PATH, odd_stream)
    client = await aiohttp_client(app)
    store.manager.writer._close_timeout = 0.5
    async with client.post(PATH, json=chat("hello")) as resp:
        assert resp.status == 200
        assert b"\\ud800" in await resp.read()
    assert await committed(store), "records never committed"
    conn = sqlite3.connect(db)
    try:
        found = conn.execute("SELECT outcome, openai_response FROM responses").fetchall()
    finally:
        conn.close()
    assert len(found) == 1, "no response row"
    ((outcome, stored),) = found
    assert outcome == "completed"
    # One U+FFFD per lone surrogate, as the README says (not one per byte of its encoding).
    assert json.loads(stored)["choices"][0]["message"]["content"] == "odd \ufffd text"


# --------------------------------------------------------------------------- session ids

ALLOWED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
# Every character class a hostile header could use, next to the allowed ones.
HOSTILE = st.sampled_from(
    [
        *sorted(ALLOWED),
        " ",
        "/",
        "\\",
        "'",
        '"',
        ";",
        "%",
        "\n",
        "\r",
        "\t",
        "\x00",
        "é",
        "٣",
        "Ａ",
        "😀",
    ]
)
ANY_TEXT = st.text(
    alphabet=st.characters(codec=None) | st.characters(categories=["Cs"]), min_size=1
)


def md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8", "surrogatepass")).hexdigest()


@settings(max_examples=300)
@given(text=ANY_TEXT)
def test_derived_id_is_md5_of_the_text_unchanged(text: str) -> None:
    session_id = generate_session_id(text)
    assert session_id == md5(text)
    assert re.fullmatch(r"[0-9a-f]{32}", session_id)
    # A derived id is a valid client-chosen id: a client can send it back in the header.
    assert validate_session_id(session_id) == session_id


@given(text=st.text(min_size=1), pad=st.sampled_from([" ", "\n", "\t", "\r\n", "\u00a0"]))
def test_no_trimming_whitespace_changes_the_id(text: str, pad: str) -> None:
    assert generate_session_id(text) != generate_session_id(pad + text)
    assert generate_session_id(text) != generate_session_id(text + pad)


@given(a=ANY_TEXT, b=ANY_TEXT)
def test_different_texts_different_ids(a: str, b: str) -> None:
    assert (generate_session_id(a) == generate_session_id(b)) == (a == b)


@given(
    value=st.none()
    | st.integers()
    | st.floats()
    | st.binary()
    | st.lists(st.text())
    | st.dictionaries(st.text(), st.text())
    | st.just("")
)
def test_empty_or_non_string_cannot_be_derived(value: object) -> None:
    with pytest.raises(InvalidSessionIdError):
        generate_session_id(value)
    with pytest.raises(ValueError, match="session id"):  # the documented type
        generate_session_id(value)


@settings(max_examples=300)
@given(credential=st.text(), text=ANY_TEXT)
def test_scoped_id_is_documented_digest_and_never_the_plain_one(credential: str, text: str) -> None:
    scoped = scoped_session_id(credential, text)
    digest = hashlib.sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()
    assert scoped == md5(f"{digest}\x00{text}")
    assert scoped == scoped_session_id(credential, text)
    assert scoped != generate_session_id(text)
    assert re.fullmatch(r"[0-9a-f]{32}", scoped)


@given(c1=st.text(), t1=ANY_TEXT, c2=st.text(), t2=ANY_TEXT)
def test_scoped_ids_collide_only_for_the_same_credential_and_text(
    c1: str, t1: str, c2: str, t2: str
) -> None:
    # The fixed-length digest before the separator makes (credential, text) unambiguous:
    # no shifting of characters between the two can give the same input to MD5.
    same = scoped_session_id(c1, t1) == scoped_session_id(c2, t2)
    assert same == ((c1, t1) == (c2, t2))


@given(credential=st.text())
def test_scoped_id_needs_a_text(credential: str) -> None:
    with pytest.raises(InvalidSessionIdError):
        scoped_session_id(credential, "")


@settings(max_examples=500)
@given(value=st.text(alphabet=HOSTILE, max_size=140) | st.text(max_size=140))
def test_session_header_accepted_exactly_when_1_to_128_allowed_chars(value: str) -> None:
    valid = 1 <= len(value) <= 128 and set(value) <= ALLOWED
    if valid:
        assert validate_session_id(value) == value
    else:
        with pytest.raises(InvalidSessionIdError):
            validate_session_id(value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)
PART = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["text", "image_url", "input_text"]) | JSON,
        "text": st.text(max_size=8) | JSON,
    },
)
MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "assistant", "system", "tool"]) | JSON,
        "content": st.text(max_size=8) | st.lists(PART | JSON, max_size=4) | JSON,
    },
)
BODY = st.one_of(
    JSON,
    st.fixed_dictionaries({"messages": st.lists(MESSAGE | JSON, max_size=5)}),
    st.fixed_dictionaries({"messages": JSON}),
)


def expected_first_user_text(body: Any) -> str | None:
    """DESIGN.md's rule, written out independently of hashing.py."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    for message in body["messages"]:
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content or None
        if isinstance(content, list):
            texts = [
                part["text"]
                for part in content
                if isinstance(part, dict)
                and part.get("type", "text") == "text"
                and isinstance(part.get("text"), str)
            ]
            return "\n".join(texts) or None
        return None
    return None


@settings(max_examples=500)
@given(body=BODY)
def test_first_user_text_never_raises_and_follows_the_rule(body: Any) -> None:
    text = first_user_text(body)
    assert text is None or (isinstance(text, str) and text)
    assert text == expected_first_user_text(body)


# --------------------------------------------------------------------------- the stream tee


class _Sink:
    """Stands in for a prepared StreamResponse: what ResponseCapture wraps."""

    content_type = "text/event-stream"

    def __init__(self) -> None:
        self.sent = bytearray()

    async def write(self, data: bytes) -> None:
        self.sent += data

    async def write_eof(self, data: bytes = b"") -> None:
        self.sent += data


def captured(chunks: list[bytes]) -> tuple[str | None, str | None, bytes]:
    """(stored text, assembled content, bytes passed on) for a stream written in `chunks`."""

    async def run() -> tuple[str | None, str | None, bytes]:
        sink = _Sink()
        capture = ResponseCapture(limit=LIMIT)
        capture.attach(cast(web.StreamResponse, sink))
        for chunk in chunks:
            await sink.write(chunk)
        await sink.write_eof()
        result = capture.result()
        return result.text, result.content, bytes(sink.sent)

    return asyncio.run(run())


def completion_stream(deltas: list[str], finish: str, eol: str) -> bytes:
    events = [{"role": "assistant", "content": ""}] + [{"content": d} for d in deltas]
    out = []
    for i, delta in enumerate(events):
        chunk = {
            "id": "chatcmpl-x",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [
                {"index": 0, "delta": delta, "finish_reason": finish if i == len(deltas) else None}
            ],
        }
        out.append(f"data: {json.dumps(chunk, ensure_ascii=False)}{eol}{eol}")
    out.append(f"data: [DONE]{eol}{eol}")
    return "".join(out).encode()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=200, deadline=None)
@given(
    deltas=st.lists(st.text(max_size=6), min_size=1, max_size=8),
    finish=st.sampled_from(["stop", "length"]),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    data=st.data(),
)
def test_any_split_of_a_handlers_writes_gives_the_same_record(
    deltas: list[str], finish: str, eol: str, data: st.DataObject
) -> None:
    stream = completion_stream(deltas, finish, eol)
    whole_text, whole_content, _ = captured([stream])
    assert whole_content == "".join(deltas)
    assert whole_text is not None
    assert json.loads(whole_text)["choices"][0]["finish_reason"] == finish
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=16))
    text, content, passed_on = captured(split_at(stream, cuts))
    assert (text, content) == (whole_text, whole_content)
    assert passed_on == stream  # the tee never alters what the client gets


@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=300), data=st.data())
def test_any_split_of_arbitrary_bytes_gives_the_same_events_at_the_default_limit(
    stream: bytes, data: st.DataObject
) -> None:
    # tests/test_sse.py checks this with a tiny max_event_bytes (overflow everywhere);
    # here at the size the store really uses, where every event is dispatched.
    def parse(chunks: list[bytes]) -> list[Any]:
        parser = SSEParser(max_event_bytes=LIMIT)
        events = [e for c in chunks for e in parser.feed(c)]
        return events + parser.close()

    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    assert parse(split_at(stream, cuts)) == parse([stream])
