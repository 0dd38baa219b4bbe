"""Running the SQL core's operations whole on the SQLite connection's own thread.

aiosqlite gives the connection one thread and hands it one call at a time; every hop to
that thread is a wake-up of the event loop. So an operation (a read, a write with its
`BEGIN IMMEDIATE ... COMMIT`, a record batch) is handed over in one hop and runs to its end
there: `ConnNow` is the core's `Conn` whose every call is done when it returns, and
`complete` runs an operation built on it without an event loop. Statement by statement,
opening a new store took ~40 hops and a session write three.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

from .core import Row

__all__ = ("ConnNow", "complete", "in_transaction", "run_rows")

R = TypeVar("R")

# Host parameters per statement: SQLite's lowest default limit (999 before 3.32), so the
# multi-row statements below run on every library version.
_MAX_PARAMS: Final = 999


@functools.lru_cache(maxsize=256)
def _multi_row(sql: str, rows: int) -> str:
    """`sql`, whose one `VALUES (?, ...)` or `IN (?)` group is repeated for `rows` rows.

    Cached: a batch only ever uses the full-chunk size and one remainder size, so the
    connection's statement cache keeps them prepared.
    """
    for opener in (" VALUES (", " IN ("):
        head, found, tail = sql.partition(opener)
        if found:
            group, _, rest = tail.partition(")")
            if opener == " IN (":
                return f"{head} IN ({', '.join([group] * rows)}){rest}"
            return f"{head} VALUES {', '.join([f'({group})'] * rows)}{rest}"
    raise ValueError(f"no parameter group to repeat in {sql!r}")


def run_rows(con: sqlite3.Connection, sql: str, rows: Sequence[Sequence[object]]) -> None:
    """Apply `sql` to every row, as many rows per statement as the parameter limit allows.

    Not `executemany` row by row: sqlite3 releases and re-takes the GIL around every
    execution, and while the event loop keeps the GIL busy (a proxy under load) each re-take
    can wait for the interpreter's switch interval. Row by row, a loaded proxy's writer
    committed a few thousand records a second and dropped records past
    `max_pending_records`; in chunks it keeps up.
    """
    per = max(1, _MAX_PARAMS // len(rows[0]))
    full = len(rows) // per
    if full:
        con.executemany(
            _multi_row(sql, per),
            [[v for row in rows[i * per : (i + 1) * per] for v in row] for i in range(full)],
        )
    rest = rows[full * per :]
    if rest:
        con.execute(_multi_row(sql, len(rest)), [v for row in rest for v in row])


class ConnNow:
    """The core's `Conn` on the connection's own thread: every call is done when it returns."""

    __slots__ = ("_con",)

    def __init__(self, con: sqlite3.Connection) -> None:
        self._con = con

    async def fetch(self, sql: str, params: Sequence[object] = ()) -> list[Row]:
        return list(self._con.execute(sql, params).fetchall())

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return self._con.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        self._con.executemany(sql, rows)

    async def insert_rows(self, sql: str, rows: Sequence[Sequence[object]]) -> None:
        run_rows(self._con, sql, rows)


def complete(awaitable: Awaitable[R]) -> R:
    """Run an operation over `ConnNow` to its end, synchronously.

    Such an operation never suspends (each of its awaits is already done), so one step of
    its coroutine finishes it. One that did suspend awaits something else, which has no
    place on the connection's thread: refused rather than left half done.
    """
    steps = awaitable.__await__()
    try:
        steps.send(None)
    except StopIteration as done:
        result: R = done.value
        return result
    steps.close()
    raise RuntimeError(
        "an operation on the SQLite thread awaited something other than its connection"
    )


def in_transaction(con: sqlite3.Connection, work: Callable[[], R]) -> R:
    """`BEGIN IMMEDIATE`, `work()`, `COMMIT`; rolled back on any error.

    IMMEDIATE takes SQLite's write lock at the start, so a transaction that reads then
    writes can never fail halfway with SQLITE_BUSY because another process wrote first.
    """
    con.execute("BEGIN IMMEDIATE")
    try:
        result = work()
        con.execute("COMMIT")
    except BaseException:
        # Nothing is left to undo when SQLite already rolled back (some errors do).
        with contextlib.suppress(sqlite3.OperationalError):
            con.execute("ROLLBACK")
        raise
    return result
