"""PostgreSQL's one-statement `resolve_session`: slide a live row or store a fresh one.

Exact `is_new` (only the statement that wrote the row says new), expired rows replaced and
counted, and two instances resolving one id at once ending with one row and one "new".
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from aiohttp_session_store.models import Session

asyncpg: Any = pytest.importorskip("asyncpg")

from test_backends_postgres import PG_DSN, sql  # noqa: E402

from aiohttp_session_store.backends.postgres import PostgresBackend  # noqa: E402

pytestmark = pytest.mark.postgres

TIMEOUT = 60_000


def fresh(sid: str, now: int, msg: str = "hi") -> Session:
    return Session(sid, None, None, msg, 0, now, now, now + TIMEOUT, is_new=True)


@pytest.fixture
async def pair(pg_schema: str) -> AsyncIterator[tuple[PostgresBackend, PostgresBackend]]:
    a = PostgresBackend(PG_DSN, schema=pg_schema, max_size=4)
    b = PostgresBackend(PG_DSN, schema=pg_schema, max_size=4)
    await asyncio.gather(a.open(), b.open())
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_a_missing_id_is_stored_new(pair: tuple[PostgresBackend, PostgresBackend]) -> None:
    a, _ = pair
    stored, replaced = await a.resolve_session(fresh("s1", 1_000))
    assert stored.is_new
    assert not replaced
    assert stored == fresh("s1", 1_000)
    assert await a.get_session("s1") == fresh("s1", 1_000)


async def test_a_live_row_is_slid_and_kept(pair: tuple[PostgresBackend, PostgresBackend]) -> None:
    a, _ = pair
    await a.resolve_session(fresh("s1", 1_000, "first"))
    await a.advance_session("s1", "p1", now=1_500, expires_at=1_500 + TIMEOUT)
    stored, replaced = await a.resolve_session(fresh("s1", 2_000, "other text"))
    assert not stored.is_new
    assert not replaced
    assert (stored.first_user_message, stored.parent_id, stored.message_count) == ("first", "p1", 1)
    assert (stored.created_at, stored.last_accessed, stored.expires_at) == (
        1_000,
        2_000,
        2_000 + TIMEOUT,
    )
    assert await a.get_session("s1") == stored


async def test_an_expired_row_is_replaced_whole(
    pair: tuple[PostgresBackend, PostgresBackend],
) -> None:
    a, _ = pair
    await a.resolve_session(fresh("s1", 1_000, "old"))
    await a.advance_session("s1", "p1", now=1_500, expires_at=1_500 + TIMEOUT)
    later = 1_500 + TIMEOUT  # expires_at <= now: expired
    stored, replaced = await a.resolve_session(fresh("s1", later, "new"))
    assert stored.is_new
    assert replaced
    assert stored == fresh("s1", later, "new")
    assert await a.get_session("s1") == fresh("s1", later, "new")


async def test_two_instances_racing_on_one_id_make_one_new_row(
    pair: tuple[PostgresBackend, PostgresBackend], pg_schema: str
) -> None:
    a, b = pair
    ids = [f"id{i}" for i in range(20)]
    calls = [
        backend.resolve_session(fresh(sid, 1_000 + n))
        for sid in ids
        for n, backend in enumerate((a, b, a, b))
    ]
    results = await asyncio.gather(*calls)
    for sid in ids:
        mine = [s for s, _ in results if s.id == sid]
        assert len(mine) == 4
        assert sum(s.is_new for s in mine) == 1
        assert not any(replaced for s, replaced in results if s.id == sid)
    rows = await sql(pg_schema, "SELECT id FROM sessions")
    assert sorted(r["id"] for r in rows) == sorted(ids)


async def test_a_released_connection_keeps_working_without_a_reset(
    pair: tuple[PostgresBackend, PostgresBackend],
) -> None:
    """No reset query on release: a failed statement still leaves the pool usable."""
    a, _ = pair
    with pytest.raises(asyncpg.PostgresError):
        await a._run(
            lambda conn: conn.fetch("SELECT 1/0"), write=True, retry=False, transaction=True
        )
    for i in range(8):  # more calls than the pool has connections
        stored, _ = await a.resolve_session(fresh(f"after{i}", 1_000))
        assert stored.is_new
