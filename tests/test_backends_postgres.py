"""PostgreSQL-only behaviour: several instances on one store, NUL escaping, read-only mode,
schema names and version checks. The behaviour shared with SQLite is in test_backends.py."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest

from aiohttp_session_store.errors import (
    DatabaseNotFoundError,
    ForeignDatabaseError,
    SchemaVersionError,
    StoreError,
    StoreUnavailableError,
)
from aiohttp_session_store.migrations import (
    MIGRATIONS,
    SCHEMA_VERSION_KEY,
    Migration,
    latest_version,
)
from aiohttp_session_store.models import (
    RequestRecord,
    ResponseRecord,
    Session,
    SessionQuery,
    WriteBatch,
)

asyncpg: Any = pytest.importorskip("asyncpg")

from aiohttp_session_store.backends.postgres import PostgresBackend  # noqa: E402

pytestmark = pytest.mark.postgres

# The same server and database conftest's fixtures use.
PG_DSN = os.environ.get("AIOHTTP_SESSION_STORE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")

T = TypeVar("T")

LATEST = latest_version()
# The registry as a later version of the package would have it: one migration more.
V2_MIGRATIONS = (
    *MIGRATIONS,
    Migration(
        LATEST + 1,
        "add notes",
        ("CREATE TABLE notes (id INTEGER)",),
        ("CREATE TABLE notes (id BIGINT)",),
    ),
)


def session(sid: str, *, created: int = 1_000, expires: int = 10**13, msg: str = "hi") -> Session:
    return Session(sid, None, None, msg, 0, created, created, expires)


def request(rid: str, body: str | None = "{}") -> RequestRecord:
    return RequestRecord(
        rid, "s", 10, "POST", "/v1/chat/completions", "m", False, body, None, "{}", 10
    )


def response(pid: str, rid: str, body: str | None = "{}") -> ResponseRecord:
    return ResponseRecord(
        pid, rid, "s", 20, 200, "completed", body, None, None, 1, 2, 3, "stop", None, 5, 1, 20
    )


async def sql(schema: str, query: str, *args: object) -> Any:
    """Fetch rows with a plain connection, bypassing the backend under test."""
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": f'"{schema}"'})
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def both(a: Awaitable[T], b: Awaitable[T]) -> tuple[T, T]:
    x, y = await asyncio.gather(a, b)
    return x, y


@pytest.fixture
async def pair(pg_schema: str) -> AsyncIterator[tuple[PostgresBackend, PostgresBackend]]:
    """Two "proxy instances": two backends, two pools, one schema, opened at the same time."""
    a = PostgresBackend(PG_DSN, schema=pg_schema, max_size=5)
    b = PostgresBackend(PG_DSN, schema=pg_schema, max_size=5)
    await both(a.open(), b.open())
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


# -- several instances on one store -------------------------------------------------------


async def test_concurrent_first_opens_migrate_once(pg_schema: str) -> None:
    backends = [PostgresBackend(PG_DSN, schema=pg_schema) for _ in range(5)]
    try:
        await asyncio.gather(*(b.open() for b in backends))
        assert [await b.schema_version() for b in backends] == [latest_version()] * 5
        rows = await sql(pg_schema, "SELECT value FROM metadata WHERE key = $1", SCHEMA_VERSION_KEY)
        assert [r["value"] for r in rows] == [str(latest_version())]
    finally:
        for b in backends:
            await b.close()


async def test_concurrent_insert_of_one_id_makes_one_row_and_one_new(
    pair: tuple[PostgresBackend, PostgresBackend], pg_schema: str
) -> None:
    a, b = pair
    ids = [f"id{i}" for i in range(20)]
    calls = [
        backend.insert_session(Session(sid, f"{n}", None, "hi", 0, 1_000, 1_000, 10**13))
        for sid in ids
        for n, backend in enumerate((a, b, a, b))
    ]
    results = await asyncio.gather(*calls)
    for sid in ids:
        mine = [r for r in results if r.id == sid]
        assert sum(r.is_new for r in mine) == 1
        stored = await a.get_session(sid)
        # Every caller got the one stored row back, the winner's.
        assert all(r == stored for r in mine)
    rows = await sql(pg_schema, "SELECT id FROM sessions")
    assert sorted(r["id"] for r in rows) == sorted(ids)


async def test_concurrent_advance_loses_no_increment(
    pair: tuple[PostgresBackend, PostgresBackend],
) -> None:
    a, b = pair
    await a.insert_session(session("s"))
    turns = 60
    await asyncio.gather(
        *(
            backend.advance_session("s", f"p{i}", now=2_000 + i, expires_at=10**13)
            for i in range(turns)
            for backend in (a, b)
        )
    )
    stored = await b.get_session("s")
    assert stored is not None
    assert stored.message_count == 2 * turns


async def test_concurrent_sweeps_split_the_expired_rows(
    pair: tuple[PostgresBackend, PostgresBackend], pg_schema: str
) -> None:
    a, b = pair
    now = 50_000
    expired = {f"x{i:03}" for i in range(300)}
    live = {f"l{i:02}" for i in range(20)}
    await a.write_batch(
        WriteBatch(
            sessions=[session(s, created=1, expires=1 + i) for i, s in enumerate(sorted(expired))]
            + [session(s, created=1, expires=now + 1) for s in live]
        )
    )

    async def sweeper(backend: PostgresBackend) -> list[str]:
        got: list[str] = []
        while ids := await backend.delete_expired_sessions(now, 7):
            got.extend(ids)
        return got

    results = await asyncio.gather(*(sweeper(x) for x in (a, b, a, b, a, b)))
    everything = [sid for ids in results for sid in ids]
    assert len(everything) == len(set(everything))  # disjoint: no row counted twice
    assert set(everything) == expired
    assert {r["id"] for r in await sql(pg_schema, "SELECT id FROM sessions")} == live


async def test_instances_see_each_others_writes(
    pair: tuple[PostgresBackend, PostgresBackend],
) -> None:
    a, b = pair
    await a.insert_session(session("s"))
    assert await b.set_chat_id("s", "chat-1", now=2_000)
    advanced = await b.advance_session("s", "p1", now=3_000, expires_at=10**13)
    assert advanced is not None
    seen = await a.get_session("s")
    assert seen is not None
    assert (seen.chat_id, seen.parent_id, seen.message_count) == ("chat-1", "p1", 1)


# -- NUL characters --------------------------------------------------------------------------


async def test_nul_in_a_request_body_round_trips_escaped(
    pg_schema: str,
) -> None:
    backend = PostgresBackend(PG_DSN, schema=pg_schema)
    await backend.open()
    try:
        body = '{"messages": [{"role": "user", "content": "a\x00b"}]}'
        reply = '{"content": "\x00"}'
        await backend.write_batch(
            WriteBatch(
                sessions=[session("s", msg="first\x00turn")],
                requests=[request("r1", body)],
                upstream_requests=[("r1", "up\x00stream")],
                responses=[response("p1", "r1", reply)],
            )
        )
        exchange = await backend.get_exchange("r1")
        assert exchange is not None
        assert exchange.response is not None
        stored = exchange.request.openai_request
        assert stored == body.replace("\x00", "\\u0000")
        assert stored is not None
        # Still JSON, and the same value the raw body (leniently) parses to.
        assert json.loads(stored) == json.loads(body, strict=False)
        assert exchange.request.upstream_request == "up\\u0000stream"
        assert exchange.response.openai_response == '{"content": "\\u0000"}'
        stored_session = await backend.get_session("s")
        assert stored_session is not None
        assert stored_session.first_user_message == "first\\u0000turn"
        # insert_session and advance_session escape too.
        created = await backend.insert_session(session("t", msg="\x00"))
        assert created.first_user_message == "\\u0000"
        advanced = await backend.advance_session("t", "p\x00", now=2_000, expires_at=10**13)
        assert advanced is not None
        assert advanced.parent_id == "p\\u0000"
    finally:
        await backend.close()


# -- schema names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["", "1abc", "a-b", "a b", 'x"; DROP SCHEMA public; --', "ä", "a" * 64, "a.b"],
)
def test_bad_schema_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="schema"):
        PostgresBackend(PG_DSN, schema=name)


async def test_mixed_case_schema_is_created_and_used_as_given(pg_schema: str) -> None:
    # pg_schema is only asked for its skip when no server answers; this test needs its own
    # name to check case is kept (an unquoted name would be folded to lower case).
    name = "Mixed_" + uuid.uuid4().hex[:10]
    backend = PostgresBackend(PG_DSN, schema=name)
    try:
        await backend.open()
        await backend.insert_session(session("s"))
        rows = await sql(name, "SELECT id FROM sessions")
        assert [r["id"] for r in rows] == ["s"]
    finally:
        await backend.close()
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()


async def test_search_path_survives_connection_reuse(pg_schema: str) -> None:
    # One connection, released and reset by the pool between calls: the schema must stick.
    backend = PostgresBackend(PG_DSN, schema=pg_schema, min_size=1, max_size=1)
    await backend.open()
    try:
        for i in range(5):
            await backend.write_batch(WriteBatch(sessions=[session(f"s{i}")]))
            assert await backend.count_sessions() == i + 1
        listed = await backend.list_sessions(SessionQuery(order="created_at_asc"))
        assert len(listed) == 5
    finally:
        await backend.close()


# -- read-only mode ---------------------------------------------------------------------------


async def test_read_only_open_of_an_empty_schema_is_not_found_and_creates_nothing(
    pg_schema: str,
) -> None:
    backend = PostgresBackend(PG_DSN, schema=pg_schema, read_only=True)
    with pytest.raises(DatabaseNotFoundError):
        await backend.open()
    rows = await sql("public", "SELECT 1 FROM pg_namespace WHERE nspname = $1", pg_schema)
    assert rows == []
    await backend.close()


async def test_read_only_reads_but_cannot_write(pg_schema: str) -> None:
    writer = PostgresBackend(PG_DSN, schema=pg_schema)
    await writer.open()
    await writer.insert_session(session("s"))
    await writer.close()

    reader = PostgresBackend(PG_DSN, schema=pg_schema, read_only=True)
    await reader.open()
    try:
        assert reader.read_only
        assert (await reader.get_session("s")) is not None
        assert await reader.count_sessions() == 1
        writes: list[Awaitable[object]] = [
            reader.insert_session(session("t")),
            reader.touch_session("s", now=2_000, expires_at=10**13),
            reader.advance_session("s", "p", now=2_000, expires_at=10**13),
            reader.set_chat_id("s", "c", now=2_000),
            reader.delete_session("s"),
            reader.delete_expired_sessions(10**14, 10),
            reader.clear_sessions(),
            reader.write_batch(WriteBatch(requests=[request("r1")])),
            reader.delete_records_before(10**14, 10),
            reader.migrate(),
        ]
        for write in writes:
            with pytest.raises(StoreError, match="read-only"):
                await write
        # Behind that check, the server itself refuses: every connection of the pool opens
        # with default_transaction_read_only=on.
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await reader._pool.execute("DELETE FROM sessions")
        assert await reader.count_sessions() == 1
    finally:
        await reader.close()


async def test_read_only_refuses_a_schema_that_needs_migrating(pg_schema: str) -> None:
    writer = PostgresBackend(PG_DSN, schema=pg_schema)
    await writer.open()
    await writer.close()
    reader = PostgresBackend(PG_DSN, schema=pg_schema, read_only=True, migrations=V2_MIGRATIONS)
    with pytest.raises(SchemaVersionError, match="run migrate"):
        await reader.open()
    await reader.close()


# -- versions ---------------------------------------------------------------------------


async def test_an_unreadable_version_is_a_schema_version_error(pg_schema: str) -> None:
    first = PostgresBackend(PG_DSN, schema=pg_schema)
    await first.open()
    await first.close()
    await sql(pg_schema, "UPDATE metadata SET value = 'banana' WHERE key = $1", SCHEMA_VERSION_KEY)
    # The same type and message as on SQLite (test_migrations).
    for read_only in (False, True):
        backend = PostgresBackend(PG_DSN, schema=pg_schema, read_only=read_only)
        with pytest.raises(SchemaVersionError, match=f"schema '{pg_schema}' has an unreadable"):
            await backend.open()
        await backend.close()


async def test_too_old_and_too_new_hints_are_the_shared_ones(pg_schema: str) -> None:
    first = PostgresBackend(PG_DSN, schema=pg_schema)
    await first.open()
    await first.close()
    reader = PostgresBackend(PG_DSN, schema=pg_schema, read_only=True, migrations=V2_MIGRATIONS)
    with pytest.raises(SchemaVersionError, match=r"needs \d+: run migrate \(`python -m"):
        await reader.open()
    older = PostgresBackend(PG_DSN, schema=pg_schema, migrations=MIGRATIONS[:1])
    with pytest.raises(SchemaVersionError, match=r"newer than .*: upgrade the package"):
        await older.open()


async def test_newer_schema_version_is_refused_untouched(pg_schema: str) -> None:
    newer = PostgresBackend(PG_DSN, schema=pg_schema, migrations=V2_MIGRATIONS)
    await newer.open()
    assert await newer.schema_version() == LATEST + 1
    await newer.close()
    metadata = "SELECT key, value, updated_at FROM metadata ORDER BY key"
    before = [tuple(r) for r in await sql(pg_schema, metadata)]

    for read_only in (False, True):
        older = PostgresBackend(PG_DSN, schema=pg_schema, read_only=read_only)
        with pytest.raises(SchemaVersionError, match="newer"):
            await older.open()
        with pytest.raises(StoreError, match="not open"):
            await older.get_session("s")
        await older.close()

    assert [tuple(r) for r in await sql(pg_schema, metadata)] == before


async def test_open_applies_a_newer_registry_and_leaves_nothing_pending(pg_schema: str) -> None:
    old = PostgresBackend(PG_DSN, schema=pg_schema)
    await old.open()
    await old.close()
    new = PostgresBackend(PG_DSN, schema=pg_schema, migrations=V2_MIGRATIONS)
    await new.open()  # a writable open applies what is pending
    try:
        assert await new.schema_version() == LATEST + 1
        assert await new.pending_migrations() == []
        assert await new.migrate() == []
        assert await sql(pg_schema, "SELECT * FROM notes") == []
    finally:
        await new.close()


async def test_failing_migration_leaves_nothing_half_done(pg_schema: str) -> None:
    first = PostgresBackend(PG_DSN, schema=pg_schema)
    await first.open()
    await first.close()
    broken = (
        *MIGRATIONS,
        Migration(
            LATEST + 1, "broken", (), ("CREATE TABLE half (id BIGINT)", "SELECT * FROM no_such")
        ),
    )
    backend = PostgresBackend(PG_DSN, schema=pg_schema, migrations=broken)
    with pytest.raises(asyncpg.UndefinedTableError):
        await backend.open()
    await backend.close()
    rows = await sql(pg_schema, "SELECT to_regclass('half') IS NULL AS gone")
    assert rows[0]["gone"]
    rows = await sql(pg_schema, "SELECT value FROM metadata WHERE key = $1", SCHEMA_VERSION_KEY)
    assert [r["value"] for r in rows] == [str(LATEST)]


# -- connecting -------------------------------------------------------------------------


async def test_unreachable_server_is_store_unavailable() -> None:
    # Port 1 on localhost: nothing listens there, the connection is refused at once.
    backend = PostgresBackend("postgresql://postgres@127.0.0.1:1/test", command_timeout=5)
    with pytest.raises(StoreUnavailableError, match="cannot connect"):
        await backend.open()
    await backend.close()


async def test_missing_database_read_only_is_not_found(pg_schema: str) -> None:
    missing = PG_DSN.rsplit("/", 1)[0] + "/no_such_db_" + pg_schema
    reader = PostgresBackend(missing, read_only=True)
    with pytest.raises(DatabaseNotFoundError):
        await reader.open()
    writer = PostgresBackend(missing)
    with pytest.raises(StoreError, match="cannot connect"):
        await writer.open()


# -- someone else's schema ---------------------------------------------------------------


async def admin(*statements: str) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def test_a_schema_holding_foreign_tables_is_refused_untouched(pg_schema: str) -> None:
    await admin(
        f'CREATE SCHEMA "{pg_schema}"',
        f'CREATE TABLE "{pg_schema}".customers (id BIGINT, name TEXT)',
    )
    backend = PostgresBackend(PG_DSN, schema=pg_schema)
    with pytest.raises(ForeignDatabaseError, match=f"schema '{pg_schema}' holds tables") as info:
        await backend.open()
    assert "customers" in str(info.value)
    await backend.close()
    rows = await sql(pg_schema, "SELECT tablename FROM pg_tables WHERE schemaname = $1", pg_schema)
    assert [r["tablename"] for r in rows] == ["customers"]

    adopted = PostgresBackend(PG_DSN, schema=pg_schema, adopt=True)
    await adopted.open()
    try:
        assert await adopted.schema_version() == LATEST
    finally:
        await adopted.close()
    again = PostgresBackend(PG_DSN, schema=pg_schema)
    await again.open()
    await again.close()


async def test_only_the_target_schema_is_checked(pg_schema: str) -> None:
    other = f"{pg_schema}_o"
    await admin(
        f'CREATE SCHEMA "{other}"',
        f'CREATE TABLE "{other}".customers (id BIGINT)',
        f'CREATE SCHEMA "{pg_schema}"',  # existing but empty: fine
    )
    try:
        backend = PostgresBackend(PG_DSN, schema=pg_schema)
        await backend.open()
        try:
            assert await backend.schema_version() == LATEST
        finally:
            await backend.close()
    finally:
        await admin(f'DROP SCHEMA "{other}" CASCADE')
