"""Record building without a server: redaction, serialisation, truncation, record fields."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from aiohttp_session_store import StoreConfig
from aiohttp_session_store.capture import one_replacement, summarize_body
from aiohttp_session_store.errors import InvalidSessionIdError
from aiohttp_session_store.hashing import generate_session_id
from aiohttp_session_store.manager import Turn
from aiohttp_session_store.models import (
    LineageNode,
    RequestRecord,
    Session,
    new_lineage_node,
    new_request_record,
    new_session,
)
from aiohttp_session_store.records import REDACTED, RecordBuilder, Recording

STARTED = 100.0


def recording(**fields: Any) -> Recording:
    return Recording(request_id="r1", started=STARTED, limit=1024, **fields)


def builder(**config: Any) -> RecordBuilder:
    return RecordBuilder(StoreConfig(**config))


def request_text(build: RecordBuilder, body: Any) -> str | None:
    raw = json.dumps(body).encode()
    record = build.request_record(
        recording(), method="POST", path="/p", headers={}, raw=raw, body=body, ts=1
    )
    return record.openai_request


def test_request_record_fields_and_redacted_headers() -> None:
    build = builder()
    body = {"model": "m", "stream": True, "messages": []}
    raw = json.dumps(body).encode()
    headers = {"Authorization": "Bearer sk-1", "api-key": "az-1", "Accept": "x"}
    record = build.request_record(
        recording(session_id="s"),
        method="POST",
        path="/p",
        headers=headers,
        raw=raw,
        body=body,
        ts=7,
    )
    assert (record.request_id, record.session_id, record.timestamp) == ("r1", "s", 7)
    assert (record.model, record.stream, record.method, record.path) == ("m", True, "POST", "/p")
    assert record.openai_request == raw.decode()  # as received, byte for byte
    assert json.loads(record.headers or "") == {
        "Authorization": REDACTED,
        "api-key": REDACTED,
        "Accept": "x",
    }


def test_credential_body_fields_are_redacted_at_the_top_level_only() -> None:
    body = {"api_key": "sk-1", "apiKey": "sk-2", "key": "sk-3", "nested": {"api_key": "keep"}}
    stored = json.loads(request_text(builder(), body) or "")
    assert stored == {
        "api_key": REDACTED,
        "apiKey": REDACTED,
        "key": REDACTED,
        "nested": body["nested"],
    }


def test_credential_body_fields_are_configurable() -> None:
    body = {"api_key": "sk-1", "token": "t-1"}
    assert json.loads(request_text(builder(redact_body_fields=("token",)), body) or "") == {
        "api_key": "sk-1",
        "token": REDACTED,
    }
    assert json.loads(request_text(builder(redact_body_fields=()), body) or "") == body


def test_upstream_bodies_lose_their_credentials_too() -> None:
    build = builder()
    rec = recording(upstream_request=b'{"key": "sk-1", "q": 1}')
    assert json.loads(build.upstream_request_text(rec) or "") == {"key": REDACTED, "q": 1}
    rec = recording(upstream_request={"api_key": "sk-1"})
    assert json.loads(build.upstream_request_text(rec) or "") == {"api_key": REDACTED}


def test_long_request_body_is_cut_and_marked() -> None:
    build = builder(max_body_bytes=10)
    text = request_text(build, {"messages": "x" * 100})
    envelope = json.loads(text or "")
    assert envelope["truncated"] is True
    assert envelope["original_bytes"] == len(json.dumps({"messages": "x" * 100}))
    assert len(envelope["prefix"].encode()) == 10


def test_failing_body_hook_stores_a_mark_not_the_body() -> None:
    def hook(value: Any) -> Any:
        raise RuntimeError("boom")

    build = builder(redact_body=hook)
    assert request_text(build, {"messages": "secret"}) == "[redaction failed]"
    assert build.hook_failed


def test_response_record_names_the_parent_this_call_set() -> None:
    build = builder()
    turn = Turn(session=None, scope="", history=[])
    rec = recording(session_id="s", turn=turn)
    body = summarize_body(b'{"usage": {"prompt_tokens": 3}, "choices": []}', 1024)
    record = build.response_record(
        rec, status=200, outcome="completed", body=body, error=None, ended=STARTED + 0.25
    )
    assert record.parent_id is None  # the handler did not advance the session
    turn.advanced, turn.reply_node_id = True, "p9"
    record = build.response_record(
        rec, status=200, outcome="completed", body=body, error=None, ended=STARTED + 0.25
    )
    assert (record.parent_id, record.prompt_tokens, record.duration_ms) == ("p9", 3, 250)
    assert record.first_byte_ms == 250  # a whole body leaves when the handler returns
    assert record.response_id == rec.response_id


def test_upstream_error_overrides_a_completed_outcome() -> None:
    rec = recording(upstream_error="upstream said 502")
    record = builder().response_record(rec, status=200, outcome="completed", body=None, error=None)
    assert (record.outcome, record.error) == ("upstream_error", "upstream said 502")


def test_session_id_from_header_or_first_user_text() -> None:
    build = builder()
    body = {"messages": [{"role": "user", "content": "Hello world"}]}
    assert build.session_id_for({}, body) == (generate_session_id("Hello world"), "Hello world")
    assert build.session_id_for({"X-Session-Id": "abc"}, body)[0] == "abc"
    with pytest.raises(InvalidSessionIdError):
        build.session_id_for({"X-Session-Id": "bad id!"}, body)


@pytest.mark.parametrize(
    ("text", "stored"),
    [("plain", "plain"), ("é\ud800x", "é\ufffdx"), ("\udfff\ud800", "\ufffd\ufffd"), ("😀", "😀")],
)
def test_each_lone_surrogate_becomes_one_replacement(text: str, stored: str) -> None:
    assert one_replacement(text) == stored


@pytest.mark.parametrize(
    ("cls", "quick", "args"),
    [
        (Session, new_session, ("s", None, "p", "first", 2, 1, 2, 3)),
        (
            RequestRecord,
            new_request_record,
            ("r", None, 1, "POST", "/", None, True, "{}", None, "{}", 1),
        ),
        (LineageNode, new_lineage_node, ("h", "", None, "c", "n", None, 2, None, 1)),
    ],
)
def test_quick_constructors_build_the_frozen_class(
    cls: type[Any], quick: Any, args: tuple[Any, ...]
) -> None:
    built = quick(*args)
    assert type(built) is cls
    assert built == cls(*args)
    assert hash(built) == hash(cls(*args))
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.created_at = 0
    assert dataclasses.replace(built, created_at=9).created_at == 9


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Authorization", "X-A", "x-a", "Host", "Cookie"]) | st.text(),
            st.text(st.characters(exclude_categories=())),
        ),
        max_size=6,
    )
)
def test_headers_json_is_what_json_dumps_writes(pairs: list[tuple[str, str]]) -> None:
    builder = RecordBuilder(StoreConfig())
    headers = CIMultiDict(pairs)
    expected = {k: (REDACTED if k.lower() in builder.redacted else v) for k, v in headers.items()}
    assert builder.headers_json(headers) == json.dumps(expected, ensure_ascii=False)
