"""sqlite_thread.py: operations run whole on the connection's thread, without a loop."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator

import pytest

from aiohttp_session_store.backends.core import Conn
from aiohttp_session_store.backends.sqlite_thread import ConnNow, complete, in_transaction


@pytest.fixture
def con() -> Iterator[sqlite3.Connection]:
    con = sqlite3.connect(":memory:", isolation_level=None)
    con.execute("CREATE TABLE t (a INTEGER, b TEXT)")
    yield con
    con.close()


def test_an_operation_of_several_statements_completes_in_one_step(
    con: sqlite3.Connection,
) -> None:
    async def op(conn: Conn) -> list[tuple[object, ...]]:
        await conn.execute("INSERT INTO t VALUES (?, ?)", (1, "one"))
        await conn.executemany("INSERT INTO t VALUES (?, ?)", [(2, "two"), (3, "three")])
        return [tuple(r) for r in await conn.fetch("SELECT a, b FROM t ORDER BY a")]

    assert complete(op(ConnNow(con))) == [(1, "one"), (2, "two"), (3, "three")]


def test_an_operation_that_awaits_anything_else_is_refused(con: sqlite3.Connection) -> None:
    async def op(conn: Conn) -> None:
        await conn.execute("INSERT INTO t VALUES (1, 'x')")
        await asyncio.sleep(0)  # suspends: no loop runs on the connection's thread

    with pytest.raises(RuntimeError, match="awaited something other than its connection"):
        complete(op(ConnNow(con)))


def test_rows_past_the_parameter_limit_are_written_in_chunks(con: sqlite3.Connection) -> None:
    rows = [(i, f"r{i}") for i in range(1_234)]  # 2,468 parameters: three statements
    complete(ConnNow(con).insert_rows("INSERT INTO t (a, b) VALUES (?, ?)", rows))
    assert con.execute("SELECT count(*), sum(a) FROM t").fetchone() == (1_234, sum(range(1_234)))


def test_a_failing_transaction_leaves_nothing(con: sqlite3.Connection) -> None:
    def work() -> None:
        con.execute("INSERT INTO t VALUES (1, 'kept?')")
        con.execute("INSERT INTO no_such_table VALUES (1)")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        in_transaction(con, work)
    assert con.execute("SELECT count(*) FROM t").fetchone() == (0,)
    assert not con.in_transaction
    assert in_transaction(con, lambda: con.execute("INSERT INTO t VALUES (2, 'y')").rowcount) == 1
    assert con.execute("SELECT count(*) FROM t").fetchone() == (1,)
