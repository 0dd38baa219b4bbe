"""The operator's tools in the SQL core (backends/reads.py, searchtext.py), on every backend:
search kept in step by batches and retention, id prefixes, keyset export, SQL statistics,
the readable views, and migration 4 indexing a store written before it."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from test_backends import T0, make_request, make_response, make_session

from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.backends.dialect import SQLITE
from aiohttp_session_store.backends.reads import stats_sql
from aiohttp_session_store.backends.searchtext import SearchHit
from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.migrations import MIGRATIONS, RESPONSE_MODEL_VERSION
from aiohttp_session_store.models import RequestQuery, WriteBatch
from aiohttp_session_store.stats import report


def chat(*messages: tuple[str, str]) -> str:
    return json.dumps({"model": "m", "messages": [{"role": r, "content": c} for r, c in messages]})


def reply(content: str) -> str:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})


async def store_calls(backend: Backend) -> None:
    """Three calls in two sessions: a refund question, a follow-up turn, a failed call."""
    await backend.write_batch(
        WriteBatch(
            sessions=[make_session("s1"), make_session("s2")],
            requests=[
                make_request(
                    "r1",
                    ts=T0,
                    body=chat(("system", "You are a billing bot"), ("user", "Where is my refund?")),
                ),
                make_request(
                    "r2",
                    ts=T0 + 10,
                    body=chat(
                        ("user", "Where is my refund?"),
                        ("assistant", "It was sent on Monday"),
                        ("user", "Thanks, what about the invoice"),
                    ),
                ),
            ],
            responses=[make_response("r1", body=reply("It was sent on Monday"))],
        )
    )
    # The second reply and a third call arrive in a later batch, as the writer sends them.
    await backend.write_batch(
        WriteBatch(
            requests=[make_request("r3", session_id="s2", ts=T0 + 20, body=chat(("user", "hi")))],
            responses=[
                make_response("r2", body=reply("Invoices are emailed")),
                replace(
                    make_response("r3", session_id="s2", outcome="upstream_error", body=None),
                    error="upstream timeout after 30s",
                ),
            ],
        )
    )


def ids(hits: list[SearchHit]) -> list[str]:
    return [h.exchange.request.request_id for h in hits]


async def test_search_finds_messages_replies_and_errors_newest_first(backend: Backend) -> None:
    await store_calls(backend)
    assert ids(await backend.search("refund")) == ["r1"]  # r2 resends it: indexed once
    assert ids(await backend.search("billing")) == ["r1"]  # the first turn's system prompt
    assert ids(await backend.search("monday")) == ["r1"]  # a reply (r2 only resends it)
    assert ids(await backend.search("invoice")) == ["r2"]
    assert ids(await backend.search("emailed")) == ["r2"]  # set by a later batch
    assert ids(await backend.search("timeout")) == ["r3"]  # the error column
    hits = await backend.search("refund")
    assert "«refund»" in hits[0].snippet.lower()
    assert hits[0].exchange.response is not None
    assert hits[0].exchange.response.outcome == "completed"
    assert ids(await backend.search("where refund")) == ["r1"]  # every word, any order
    assert ids(await backend.search('"refund where"')) == []  # a phrase keeps its order
    assert ids(await backend.search('"where is my"')) == ["r1"]


async def test_a_replayed_batch_indexes_each_call_once_with_its_last_reply(
    backend: Backend,
) -> None:
    """Requests and replies of one batch are indexed by one statement; replaying it is harmless."""
    batch = WriteBatch(
        requests=[make_request("r1", ts=T0, body=chat(("user", "Where is my refund?")))],
        responses=[
            make_response("r1", body=reply("checking the ledger")),
            replace(make_response("r1", body=reply("It was sent on Monday")), response_id="p2"),
        ],
    )
    await backend.write_batch(batch)
    await backend.write_batch(batch)
    assert ids(await backend.search("refund")) == ["r1"]
    assert ids(await backend.search("monday")) == ["r1"]
    assert ids(await backend.search("ledger")) == []  # a later reply of the call replaced it


async def test_search_filters_and_limit(backend: Backend) -> None:
    await store_calls(backend)
    await backend.write_batch(
        WriteBatch(requests=[make_request("r4", ts=T0 + 30, body=chat(("user", "refund again")))])
    )
    assert ids(await backend.search("refund")) == ["r4", "r1"]
    assert ids(await backend.search("refund", limit=1)) == ["r4"]
    assert ids(await backend.search("refund", since=T0 + 1)) == ["r4"]
    assert ids(await backend.search("refund OR hi", session_id="s2")) == []
    assert ids(await backend.search("hi", session_id="s2")) == ["r3"]
    only = (await backend.search("refund", limit=1))[0]
    assert only.exchange.response is None  # in flight: no response yet


@pytest.mark.parametrize(
    "query",
    ['"', 'refund"', "NEAR(refund", "refund OR", "refund*", "prompt:refund", "-refund", "'; --"],
)
async def test_search_query_syntax_is_plain_text(backend: Backend, query: str) -> None:
    await store_calls(backend)
    if query in ('"', "'; --"):
        with pytest.raises(ValueError, match="no words"):
            await backend.search(query)
        return
    found = ids(await backend.search(query))
    # Never an error; at most the literal words match ("or", "near", "prompt" are words).
    assert found in ([], ["r1"])


async def test_retention_removes_search_documents(backend: Backend) -> None:
    await store_calls(backend)
    assert await backend.delete_records_before(T0 + 5, 10) == 1  # r1 only
    assert ids(await backend.search("refund")) == []
    assert ids(await backend.search("invoice")) == ["r2"]


async def test_replayed_batch_keeps_one_document(backend: Backend) -> None:
    batch = WriteBatch(
        requests=[make_request("r1", body=chat(("user", "refund please")))],
        responses=[make_response("r1", body=reply("done"))],
    )
    await backend.write_batch(batch)
    await backend.write_batch(batch)
    assert ids(await backend.search("refund")) == ["r1"]
    assert ids(await backend.search("done")) == ["r1"]


async def test_id_prefixes_resolve_by_range(backend: Backend) -> None:
    await backend.write_batch(
        WriteBatch(
            sessions=[make_session("abc1"), make_session("abc2"), make_session("abd")],
            # A session whose row is gone still has its records.
            requests=[make_request("req-x", session_id="abz"), make_request("req-y")],
        )
    )
    assert await backend.find_id_prefix("session", "abc") == ["abc1", "abc2"]
    assert await backend.find_id_prefix("session", "ab") == ["abc1", "abc2", "abd", "abz"]
    assert await backend.find_id_prefix("session", "abz") == ["abz"]
    assert await backend.find_id_prefix("session", "x") == []
    # Wildcards are characters, not patterns.
    assert await backend.find_id_prefix("session", "a%") == []
    assert await backend.find_id_prefix("session", "a_") == []
    assert await backend.find_id_prefix("request", "req-") == ["req-x", "req-y"]
    many = [make_session(f"z{i:02d}") for i in range(15)]
    await backend.write_batch(WriteBatch(sessions=many))
    assert len(await backend.find_id_prefix("session", "z")) == 11  # enough to say "more"


async def test_export_pages_by_key_cover_every_row_once(backend: Backend) -> None:
    # Equal timestamps across page boundaries: the id breaks the tie.
    requests = [make_request(f"r{i:02d}", ts=T0 + i // 3) for i in range(20)]
    await backend.write_batch(
        WriteBatch(requests=requests, responses=[make_response("r05", body=reply("x"))])
    )
    seen: list[str] = []
    after = None
    while True:
        page, after = await backend.export_page(RequestQuery(session_id="s1"), after, 7)
        if not page:
            break
        seen += [e.request.request_id for e in page]
        assert len(page) <= 7
    assert seen == [f"r{i:02d}" for i in range(20)]
    page, _ = await backend.export_page(RequestQuery(since=T0 + 5), None, 100)
    assert [e.request.request_id for e in page] == ["r15", "r16", "r17", "r18", "r19"]
    page, _ = await backend.export_page(RequestQuery(), None, 100)
    assert next(e for e in page if e.request.request_id == "r05").response is not None


async def test_sql_stats_equal_the_python_report(backend: Backend) -> None:
    requests, responses = [], []
    for i in range(41):
        model = ("a", "b", None)[i % 3]
        requests.append(make_request(f"r{i}", ts=T0 + i, model=model))
        responses.append(
            make_response(
                f"r{i}",
                duration=(i * 37) % 101,
                first_byte=None if i % 4 == 0 else (i * 13) % 29,
                tokens=(None, None, None) if i % 5 == 0 else (i, 2 * i, 3 * i),
                outcome="completed" if i % 6 else "client_disconnected",
            )
        )
    await backend.write_batch(WriteBatch(requests=requests, responses=responses))
    for query in (RequestQuery(), RequestQuery(model="a"), RequestQuery(since=T0 + 30)):
        expected = report(await backend.response_facts(query))
        assert (await backend.response_stats(query)).to_json() == expected.to_json()
    empty = await backend.response_stats(RequestQuery(model="nope"))
    assert empty.overall.requests == 0
    assert empty.overall.duration_ms.p50 is None


def _stats_batch(n: int, prefix: str = "r") -> WriteBatch:
    """Calls over models a, b and none, with every kind of duration, first byte and usage."""
    requests, responses = [], []
    for i in range(n):
        model = ("a", "b", None)[i % 3]
        requests.append(make_request(f"{prefix}{i}", ts=T0 + i, model=model))
        responses.append(
            make_response(
                f"{prefix}{i}",
                duration=(i * 31) % 53,
                first_byte=None if i % 5 == 0 else (i * 7) % 11,
                tokens=(None, None, None) if i % 4 == 0 else (i, i, 2 * i),
                outcome="completed" if i % 7 else "upstream_error",
            )
        )
    return WriteBatch(requests=requests, responses=responses)


async def assert_stats_match_the_report(backend: Backend, *queries: RequestQuery) -> None:
    for query in queries:
        expected = report(await backend.response_facts(query))
        assert (await backend.response_stats(query)).to_json() == expected.to_json()


async def test_stats_of_responses_recorded_apart_from_their_request(backend: Backend) -> None:
    # The request in one batch, its response in a later one, then the same response
    # again (sync durability records a stream's reply twice): each keeps its model.
    batch = _stats_batch(12)
    await backend.write_batch(WriteBatch(requests=batch.requests))
    await backend.write_batch(WriteBatch(responses=batch.responses))
    again = [replace(r, duration_ms=r.duration_ms + 1000) for r in batch.responses[:4]]
    await backend.write_batch(WriteBatch(responses=again))
    stats = await backend.response_stats(RequestQuery())
    assert [(m, s.requests) for m, s in stats.by_model] == [("a", 4), ("b", 4), (None, 4)]
    # The rewritten durations (1000, 1031, 1009, 1040) replace the first ones.
    assert stats.overall.requests == 12
    assert stats.overall.duration_ms.p95 == 1040
    await assert_stats_match_the_report(backend, RequestQuery(), RequestQuery(model="b"))


async def test_stats_of_a_store_migrated_to_response_models(
    backend_factory: Callable[..., Backend],
) -> None:
    before = tuple(m for m in MIGRATIONS if m.version < RESPONSE_MODEL_VERSION)
    old = backend_factory(migrations=before)
    await old.open()
    try:
        await old.write_batch(_stats_batch(30))
    finally:
        await old.close()
    new = backend_factory()
    await new.open()  # migrates: the responses written before get their request's model
    try:
        await new.write_batch(_stats_batch(9, prefix="later"))
        stats = await new.response_stats(RequestQuery())
        assert [(m, s.requests) for m, s in stats.by_model] == [("a", 13), ("b", 13), (None, 13)]
        await assert_stats_match_the_report(
            new, RequestQuery(), RequestQuery(model="a"), RequestQuery(since=T0 + 20)
        )
    finally:
        await new.close()


async def test_views_show_iso_times_and_turns(backend_kind: str, backend: Backend) -> None:
    await store_calls(backend)
    rows = await backend._read(  # type: ignore[attr-defined]
        "SELECT id, message_count, turns, created_at FROM sessions_view ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        ("s1", 0, 2, "2023-11-14T22:13:20.000Z"),
        ("s2", 0, 0, "2023-11-14T22:13:20.000Z"),  # its one call failed
    ]
    rows = await backend._read(  # type: ignore[attr-defined]
        "SELECT request_id, time FROM requests_view ORDER BY request_id"
    )
    assert [tuple(r) for r in rows][1] == ("r2", "2023-11-14T22:13:20.010Z")
    rows = await backend._read(  # type: ignore[attr-defined]
        "SELECT outcome, error, time FROM responses_view WHERE request_id = 'r3'"
    )
    assert [tuple(r) for r in rows] == [
        ("upstream_error", "upstream timeout after 30s", "2023-11-14T22:13:20.100Z")
    ]


async def test_migration_indexes_existing_rows(backend_factory: Callable[..., Backend]) -> None:
    before = tuple(m for m in MIGRATIONS if m.version < 4)
    old = backend_factory(migrations=before)
    await old.open()
    try:
        await old.write_batch(
            WriteBatch(
                requests=[make_request(f"r{i}", ts=T0 + i) for i in range(2500)]
                + [make_request("last", ts=T0 + 9999, body=chat(("user", "refund please")))],
                responses=[make_response("last", body=reply("sent"))],
            )
        )
    finally:
        await old.close()
    new = backend_factory()
    await new.open()  # migrates 4 and 5, indexing in pages
    try:
        assert ids(await new.search("refund")) == ["last"]
        assert ids(await new.search("sent")) == ["last"]
    finally:
        await new.close()


def test_sqlite_user_can_query_views_with_sqlite3(db_path: Path) -> None:
    import asyncio

    async def make() -> None:
        b = SQLiteBackend(db_path)
        await b.open()
        await store_calls(b)
        await b.close()

    asyncio.run(make())
    conn = sqlite3.connect(db_path)
    try:
        turns = conn.execute("SELECT id, turns FROM sessions_view ORDER BY id").fetchall()
    finally:
        conn.close()
    assert turns == [("s1", 2), ("s2", 0)]


async def test_sqlite_stats_read_one_covering_index_each(db_path: Path) -> None:
    # What keeps stats over 1M calls under 2 s: no join, no sort, no table row read.
    backend = SQLiteBackend(db_path)
    await backend.open()
    try:
        for query, index_use in (
            (RequestQuery(), "SCAN r USING COVERING INDEX idx_responses_model_"),
            (RequestQuery(model="a"), "SEARCH r USING COVERING INDEX idx_responses_model_"),
        ):
            for sql, params in stats_sql(SQLITE, query):
                plan = await backend._read(f"EXPLAIN QUERY PLAN {sql}", params)
                assert [str(row[3]).startswith(index_use) for row in plan] == [True]
    finally:
        await backend.close()
