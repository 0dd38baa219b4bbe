"""Schema migrations and opening databases: the schema DESIGN.md promises, all-or-nothing
migrations, refusing newer databases untouched, and read-only opens that change nothing.

The first tests run against every backend; the rest inspect the SQLite file directly.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from test_backends import T0, make_request, make_response, make_session

from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.errors import (
    DatabaseNotFoundError,
    ForeignDatabaseError,
    SchemaVersionError,
    StoreError,
)
from aiohttp_session_store.migrations import (
    METADATA_DDL,
    MIGRATIONS,
    SCHEMA_VERSION_KEY,
    Migration,
    latest_version,
)
from aiohttp_session_store.models import RequestQuery, Session, SessionQuery, WriteBatch

LATEST = latest_version()
INITIAL = MIGRATIONS[0]

# -- every backend -----------------------------------------------------------------------


async def test_migrating_again_is_a_no_op(
    backend: Backend, backend_factory: Callable[..., Backend]
) -> None:
    assert await backend.schema_version() == LATEST
    assert await backend.migrate() == []
    again = backend_factory()
    await again.open()
    try:
        assert await again.pending_migrations() == []
        assert await again.migrate() == []
        assert await again.schema_version() == LATEST
    finally:
        await again.close()


async def test_concurrent_first_opens_migrate_once(
    backend_factory: Callable[..., Backend],
) -> None:
    backends = [backend_factory() for _ in range(3)]
    try:
        await asyncio.gather(*(b.open() for b in backends))
        for b in backends:
            assert await b.schema_version() == LATEST
    finally:
        for b in backends:
            await b.close()


async def _index_names(backend: Backend, kind: str) -> set[str]:
    sql = (
        "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
        if kind == "postgres"
        else "SELECT name FROM sqlite_master WHERE type = 'index'"
    )
    return {str(row[0]) for row in await backend._read(sql)}  # type: ignore[attr-defined]


async def test_migration_7_drops_the_unused_indexes_and_keeps_the_data(
    backend_kind: str, backend_factory: Callable[..., Backend]
) -> None:
    old = backend_factory(migrations=tuple(m for m in MIGRATIONS if m.version < 7))
    await old.open()
    try:
        assert await old.schema_version() == 6
        before = await _index_names(old, backend_kind)
        assert {"idx_sessions_chat_id", "idx_responses_timestamp"} <= before
        await old.insert_session(make_session("kept"))
        await old.write_batch(
            WriteBatch(requests=[make_request("r1", session_id="kept")],
                       responses=[make_response("r1", session_id="kept")])
        )  # fmt: skip
    finally:
        await old.close()
    new = backend_factory()
    await new.open()
    try:
        assert await new.schema_version() == LATEST
        assert await new.get_session("kept") == make_session("kept")
        [exchange] = await new.list_exchanges(RequestQuery(session_id="kept"))
        assert exchange.response == make_response("r1", session_id="kept")
        # What response_facts reads (the viewer's filters) still finds the call.
        facts = await new.response_facts(RequestQuery(since=T0, model="qwen-max"))
        assert [f.session_id for f in facts] == ["kept"]
        after = await _index_names(new, backend_kind)
        assert after == before - {"idx_sessions_chat_id", "idx_responses_timestamp"}
    finally:
        await new.close()


# -- SQLite: helpers ---------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint(path: Path) -> None:
    """Fold the WAL into the main file, so its bytes are the whole database."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def query(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(sql, params).fetchall())
    finally:
        conn.close()


def execute(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


def tables(path: Path) -> set[str]:
    return {
        str(row[0])
        for row in query(path, "SELECT name FROM sqlite_master WHERE type = 'table'")
        if not str(row[0]).startswith("sqlite_")
    }


def stored_version(path: Path) -> str | None:
    rows = query(path, "SELECT value FROM metadata WHERE key = ?", (SCHEMA_VERSION_KEY,))
    return str(rows[0][0]) if rows else None


def set_version(path: Path, version: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(
            "UPDATE metadata SET value = ? WHERE key = ?", (str(version), SCHEMA_VERSION_KEY)
        )
    finally:
        conn.close()


def size(path: Path) -> int | None:
    """The file's size, None if it does not exist."""
    return path.stat().st_size if path.exists() else None


def write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def opened_version(path: Path) -> int:
    """The schema version a store of the default registry opens (and migrates) `path` at."""
    b = SQLiteBackend(path)
    await b.open()
    try:
        return await b.schema_version()
    finally:
        await b.close()


async def make_store(path: Path, migrations: tuple[Migration, ...] = MIGRATIONS) -> None:
    """A database at the registry's version, with a little data, closed and checkpointed."""
    b = SQLiteBackend(path, migrations=migrations)
    await b.open()
    try:
        if migrations == MIGRATIONS:
            await b.insert_session(Session("s1", "c", "p", "Hello world", 1, 1, 2, 3))
    finally:
        await b.close()
    checkpoint(path)


def with_registry(backend: SQLiteBackend, migrations: tuple[Migration, ...]) -> None:
    """Swap an open backend's registry: how a newer package meets an older database."""
    backend._migrations = migrations
    backend._latest = latest_version(migrations)


def extra_migration(version: int = LATEST + 1) -> Migration:
    return Migration(
        version,
        "add notes",
        ("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL)",),
        ("CREATE TABLE notes (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)",),
    )


# -- SQLite: the schema ------------------------------------------------------------------

# (name, declared type, NOT NULL, primary key position) of every column, as DESIGN.md says.
EXPECTED_COLUMNS: dict[str, list[tuple[str, str, int, int]]] = {
    "sessions": [
        ("id", "TEXT", 0, 1),
        ("chat_id", "TEXT", 0, 0),
        ("parent_id", "TEXT", 0, 0),
        ("first_user_message", "TEXT", 1, 0),
        ("message_count", "INTEGER", 1, 0),
        ("created_at", "INTEGER", 1, 0),
        ("last_accessed", "INTEGER", 1, 0),
        ("expires_at", "INTEGER", 1, 0),
    ],
    "requests": [
        ("id", "INTEGER", 0, 1),
        ("request_id", "TEXT", 1, 0),
        ("session_id", "TEXT", 0, 0),
        ("timestamp", "INTEGER", 1, 0),
        ("method", "TEXT", 1, 0),
        ("path", "TEXT", 1, 0),
        ("model", "TEXT", 0, 0),
        ("stream", "INTEGER", 1, 0),
        ("openai_request", "TEXT", 0, 0),
        ("upstream_request", "TEXT", 0, 0),
        ("headers", "TEXT", 0, 0),
        ("created_at", "INTEGER", 1, 0),
    ],
    "responses": [
        ("id", "INTEGER", 0, 1),
        ("response_id", "TEXT", 1, 0),
        ("request_id", "TEXT", 1, 0),
        ("session_id", "TEXT", 0, 0),
        ("timestamp", "INTEGER", 1, 0),
        ("status_code", "INTEGER", 0, 0),
        ("outcome", "TEXT", 1, 0),
        ("openai_response", "TEXT", 0, 0),
        ("upstream_response", "TEXT", 0, 0),
        ("parent_id", "TEXT", 0, 0),
        ("prompt_tokens", "INTEGER", 0, 0),
        ("completion_tokens", "INTEGER", 0, 0),
        ("total_tokens", "INTEGER", 0, 0),
        ("finish_reason", "TEXT", 0, 0),
        ("error", "TEXT", 0, 0),
        ("duration_ms", "INTEGER", 1, 0),
        ("first_byte_ms", "INTEGER", 0, 0),
        ("created_at", "INTEGER", 1, 0),
        # Migration 6: the request's model, copied for statistics.
        ("model", "TEXT", 0, 0),
    ],
    "lineage": [
        ("hash", "TEXT", 0, 1),
        ("scope", "TEXT", 1, 0),
        ("session_id", "TEXT", 0, 0),
        ("chat_id", "TEXT", 0, 0),
        ("node_id", "TEXT", 1, 0),
        ("response_id", "TEXT", 0, 0),
        ("depth", "INTEGER", 1, 0),
        ("parent_hash", "TEXT", 0, 0),
        ("created_at", "INTEGER", 1, 0),
    ],
    # The FTS5 table of migration 4 (its shadow tables are FTS5's own business).
    "search_docs": [("prompt", "", 0, 0), ("reply", "", 0, 0)],
    "metadata": [
        ("key", "TEXT", 0, 1),
        ("value", "TEXT", 1, 0),
        ("updated_at", "INTEGER", 1, 0),
    ],
}

# (table, indexed columns, unique, origin): "c" CREATE INDEX, "u" UNIQUE, "pk" PRIMARY KEY.
EXPECTED_INDEXES: set[tuple[str, tuple[str, ...], int, str]] = {
    ("sessions", ("id",), 1, "pk"),
    ("sessions", ("expires_at",), 0, "c"),
    ("sessions", ("created_at",), 0, "c"),
    ("requests", ("request_id",), 1, "u"),
    ("requests", ("session_id", "timestamp"), 0, "c"),
    ("requests", ("timestamp",), 0, "c"),
    ("responses", ("response_id",), 1, "u"),
    ("responses", ("request_id",), 0, "c"),
    ("responses", ("session_id",), 0, "c"),
    (
        "responses",
        ("model", "outcome", "duration_ms", "prompt_tokens", "completion_tokens", "total_tokens"),
        0,
        "c",
    ),
    ("responses", ("model", "first_byte_ms"), 0, "c"),
    ("lineage", ("hash",), 1, "pk"),
    ("lineage", ("session_id",), 0, "c"),
    ("lineage", ("created_at",), 0, "c"),
    ("metadata", ("key",), 1, "pk"),
}
EXPECTED_INDEX_NAMES = {
    "idx_sessions_expires_at",
    "idx_sessions_created_at",
    "idx_requests_session_id",
    "idx_requests_timestamp",
    "idx_responses_request_id",
    "idx_responses_session_id",
    "idx_responses_model_stats",
    "idx_responses_model_first_byte",
    "idx_lineage_session_id",
    "idx_lineage_created_at",
}


def schema_of(
    path: Path,
) -> tuple[
    dict[str, list[tuple[str, str, int, int]]], set[tuple[str, tuple[str, ...], int, str]], set[str]
]:
    conn = sqlite3.connect(path)
    try:
        columns = {}
        indexes = set()
        names = set()
        for table in tables(path):
            if table.startswith("search_docs_"):
                continue
            columns[table] = [
                (str(name), str(type_), int(notnull), int(pk))
                for _cid, name, type_, notnull, _default, pk in conn.execute(
                    "SELECT * FROM pragma_table_info(?)", (table,)
                )
            ]
            for _seq, name, unique, origin, _partial in conn.execute(
                "SELECT * FROM pragma_index_list(?)", (table,)
            ):
                cols = tuple(
                    str(row[0])
                    for row in conn.execute(
                        "SELECT name FROM pragma_index_info(?) ORDER BY seqno", (name,)
                    )
                )
                indexes.add((table, cols, int(unique), str(origin)))
                if origin == "c":
                    names.add(str(name))
        return columns, indexes, names
    finally:
        conn.close()


async def test_fresh_database_has_exactly_the_documented_schema(db_path: Path) -> None:
    b = SQLiteBackend(db_path)
    await b.open()
    await b.close()
    columns, indexes, names = schema_of(db_path)
    assert columns == EXPECTED_COLUMNS
    assert indexes == EXPECTED_INDEXES
    assert names == EXPECTED_INDEX_NAMES
    fks = query(db_path, 'SELECT "table", "from", "to" FROM pragma_foreign_key_list(\'responses\')')
    assert fks == [("requests", "request_id", "request_id")]
    assert query(db_path, "SELECT key, value FROM metadata") == [(SCHEMA_VERSION_KEY, str(LATEST))]
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]


async def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "sessions.db"
    b = SQLiteBackend(path)
    await b.open()
    await b.close()
    assert path.is_file()


async def test_reopening_changes_nothing(db_path: Path) -> None:
    await make_store(db_path)
    before = query(db_path, "SELECT key, value, updated_at FROM metadata")
    digest = sha256(db_path)
    b = SQLiteBackend(db_path)
    await b.open()
    assert await b.migrate() == []
    await b.close()
    checkpoint(db_path)
    assert query(db_path, "SELECT key, value, updated_at FROM metadata") == before
    assert sha256(db_path) == digest


# -- SQLite: applying migrations ---------------------------------------------------------


async def test_pending_migrations_are_applied_in_order(db_path: Path) -> None:
    await make_store(db_path)
    b = SQLiteBackend(db_path)
    await b.open()
    try:
        # The second depends on the first: applying them out of order would fail.
        alter = Migration(LATEST + 2, "notes.y", ("ALTER TABLE notes ADD COLUMN y TEXT",), ())
        with_registry(b, (*MIGRATIONS, extra_migration(), alter))
        assert await b.pending_migrations() == [(LATEST + 1, "add notes"), (LATEST + 2, "notes.y")]
        assert await b.migrate() == [(LATEST + 1, "add notes"), (LATEST + 2, "notes.y")]
        assert await b.schema_version() == LATEST + 2
        assert await b.pending_migrations() == []
        assert await b.migrate() == []
        # The data from before is still there.
        assert await b.count_sessions() == 1
    finally:
        await b.close()
    assert stored_version(db_path) == str(LATEST + 2)
    assert "notes" in tables(db_path)


async def test_a_registry_out_of_order_is_applied_by_version(db_path: Path) -> None:
    alter = Migration(LATEST + 2, "notes.y", ("ALTER TABLE notes ADD COLUMN y TEXT",), ())
    b = SQLiteBackend(db_path, migrations=(alter, extra_migration(), *MIGRATIONS))
    await b.open()
    try:
        assert await b.schema_version() == LATEST + 2
    finally:
        await b.close()
    assert [row[1] for row in query(db_path, "PRAGMA table_info(notes)")] == ["id", "body", "y"]


async def test_concurrent_migrate_calls_apply_each_migration_once(db_path: Path) -> None:
    await make_store(db_path)
    b = SQLiteBackend(db_path)
    await b.open()
    try:
        with_registry(b, (*MIGRATIONS, extra_migration()))
        results = await asyncio.gather(*(b.migrate() for _ in range(5)))
        # CREATE TABLE notes would fail the second time: exactly one call applied it.
        assert sorted(results) == [[], [], [], [], [(LATEST + 1, "add notes")]]
        assert await b.schema_version() == LATEST + 1
    finally:
        await b.close()


async def test_a_failing_migration_leaves_nothing_half_done(db_path: Path) -> None:
    broken = Migration(
        LATEST + 1,
        "broken",
        ("CREATE TABLE half_done (x INTEGER)", "THIS IS NOT SQL"),
        (),
    )
    await make_store(db_path)
    b = SQLiteBackend(db_path, migrations=(*MIGRATIONS, broken))
    with pytest.raises(sqlite3.OperationalError, match="syntax error"):
        await b.open()
    # The earlier migrations stay committed; the broken one left no table and no version.
    assert stored_version(db_path) == str(LATEST)
    assert "half_done" not in tables(db_path)
    assert {"sessions", "requests", "responses", "metadata"} <= tables(db_path)
    # The failed open released its connection; the default registry opens fine.
    assert await opened_version(db_path) == LATEST


async def test_a_new_database_gets_all_its_migrations_or_none(db_path: Path) -> None:
    # One transaction for a new database: a failing last step leaves nothing behind.
    broken = Migration(LATEST + 1, "broken", ("CREATE TABLE half_done (x INTEGER)", "NOT SQL"), ())
    b = SQLiteBackend(db_path, migrations=(*MIGRATIONS, broken))
    with pytest.raises(sqlite3.OperationalError):
        await b.open()
    assert tables(db_path) == set()
    assert await opened_version(db_path) == LATEST


async def test_a_failing_first_migration_leaves_an_empty_database(db_path: Path) -> None:
    broken = Migration(1, "broken", ("CREATE TABLE sessions (id TEXT)", "NOT SQL"), ())
    b = SQLiteBackend(db_path, migrations=(broken,))
    with pytest.raises(sqlite3.OperationalError):
        await b.open()
    # Not even `metadata`: it is created inside the migration's transaction.
    assert tables(db_path) == set()


def test_registry_versions_must_be_unique(db_path: Path) -> None:
    with pytest.raises(ValueError, match="unique"):
        SQLiteBackend(db_path, migrations=(*MIGRATIONS, INITIAL))


# -- SQLite: newer databases -------------------------------------------------------------


async def test_a_newer_database_is_refused_untouched(db_path: Path) -> None:
    await make_store(db_path)
    set_version(db_path, LATEST + 1)
    checkpoint(db_path)
    digest = sha256(db_path)
    for read_only in (False, True):
        b = SQLiteBackend(db_path, read_only=read_only)
        with pytest.raises(SchemaVersionError, match="newer"):
            await b.open()
        assert sha256(db_path) == digest
    assert stored_version(db_path) == str(LATEST + 1)


async def test_a_newer_rollback_journal_database_is_not_switched_to_wal(db_path: Path) -> None:
    # Written by something that never enabled WAL: enabling it would rewrite the header,
    # so the version must be checked before the journal mode is touched.
    execute(
        db_path,
        METADATA_DDL["sqlite"],
        f"INSERT INTO metadata VALUES ('{SCHEMA_VERSION_KEY}', '{LATEST + 5}', 0)",
    )
    digest = sha256(db_path)
    with pytest.raises(SchemaVersionError):
        await SQLiteBackend(db_path).open()
    assert sha256(db_path) == digest
    assert query(db_path, "PRAGMA journal_mode") == [("delete",)]


async def test_migrate_refuses_a_database_that_became_newer(db_path: Path) -> None:
    # Another process upgraded the file while this backend was open.
    b = SQLiteBackend(db_path)
    await b.open()
    try:
        set_version(db_path, LATEST + 1)
        with pytest.raises(SchemaVersionError):
            await b.migrate()
    finally:
        await b.close()


# -- SQLite: metadata --------------------------------------------------------------------


async def test_metadata_uses_its_own_key_and_leaves_other_rows_alone(db_path: Path) -> None:
    # Another program's rows in a `metadata` table, including a generic "schema_version".
    execute(
        db_path,
        METADATA_DDL["sqlite"],
        "INSERT INTO metadata VALUES ('schema_version', '42', 7)",
        "INSERT INTO metadata VALUES ('other.app.setting', 'x', 8)",
    )
    assert await opened_version(db_path) == LATEST
    rows = query(db_path, "SELECT key, value FROM metadata ORDER BY key")
    assert rows == [
        (SCHEMA_VERSION_KEY, str(LATEST)),
        ("other.app.setting", "x"),
        ("schema_version", "42"),
    ]
    assert query(db_path, "SELECT updated_at FROM metadata WHERE key = 'schema_version'") == [(7,)]


async def test_an_unreadable_version_is_a_schema_version_error(db_path: Path) -> None:
    await make_store(db_path)
    execute(
        db_path,
        f"UPDATE metadata SET value = 'banana' WHERE key = '{SCHEMA_VERSION_KEY}'",
    )
    # The same type and message as on PostgreSQL (test_backends_postgres).
    for read_only in (False, True):
        with pytest.raises(SchemaVersionError, match=r"sessions\.db has an unreadable .*banana"):
            await SQLiteBackend(db_path, read_only=read_only).open()


async def test_too_old_and_too_new_hints_are_the_shared_ones(db_path: Path) -> None:
    await make_store(db_path)
    reader = SQLiteBackend(db_path, read_only=True, migrations=(*MIGRATIONS, extra_migration()))
    with pytest.raises(SchemaVersionError, match=r"needs \d+: run migrate \(`python -m"):
        await reader.open()
    older = SQLiteBackend(db_path, migrations=MIGRATIONS[:1])
    with pytest.raises(SchemaVersionError, match=r"newer than .*: upgrade the package"):
        await older.open()


# -- SQLite: read-only opens -------------------------------------------------------------


async def test_read_only_open_of_a_missing_file_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "missing.db"
    b = SQLiteBackend(path, read_only=True)
    with pytest.raises(DatabaseNotFoundError, match=r"no database at .*missing\.db"):
        await b.open()
    assert listing(tmp_path) == []
    # Same in an existing directory.
    b = SQLiteBackend(tmp_path / "missing.db", read_only=True)
    with pytest.raises(DatabaseNotFoundError):
        await b.open()
    assert listing(tmp_path) == []


@pytest.mark.parametrize("read_only", [True, False])
async def test_a_file_that_is_not_a_database_is_a_store_error(
    db_path: Path, read_only: bool
) -> None:
    write(db_path, b"these are not the pages you are looking for\n" * 200)
    digest = sha256(db_path)
    b = SQLiteBackend(db_path, read_only=read_only)
    with pytest.raises(StoreError) as info:
        await b.open()
    message = str(info.value)
    assert str(db_path) in message
    assert "not a SQLite database" in message
    assert "\n" not in message
    assert sha256(db_path) == digest


async def test_read_only_open_never_changes_the_file(db_path: Path) -> None:
    await make_store(db_path)
    digest = sha256(db_path)
    b = SQLiteBackend(db_path, read_only=True)
    await b.open()
    try:
        assert b.read_only
        assert await b.schema_version() == LATEST
        assert await b.pending_migrations() == []
        assert await b.get_session("s1") is not None
        assert await b.count_sessions() == 1
        assert len(await b.list_sessions(SessionQuery())) == 1
        assert await b.list_exchanges(RequestQuery()) == []
        assert await b.count_requests(RequestQuery()) == 0
        assert await b.response_facts(RequestQuery()) == []
        with pytest.raises(StoreError, match="read-only"):
            await b.migrate()
        with pytest.raises(StoreError, match="read-only"):
            await b.delete_session("s1")
    finally:
        await b.close()
    assert sha256(db_path) == digest
    # SQLite may leave its (empty) WAL index files beside the database; never any content.
    assert size(db_path.with_name(db_path.name + "-wal")) in (None, 0)


async def test_read_only_open_sees_a_live_writers_commits(db_path: Path) -> None:
    writer = SQLiteBackend(db_path)
    await writer.open()
    try:
        await writer.insert_session(Session("s1", None, None, "hi", 0, 1, 1, 2))
        reader = SQLiteBackend(db_path, read_only=True)
        await reader.open()
        try:
            assert await reader.count_sessions() == 1
            await writer.insert_session(Session("s2", None, None, "hi", 0, 1, 1, 2))
            assert await reader.count_sessions() == 2
        finally:
            await reader.close()
    finally:
        await writer.close()


async def test_read_only_open_of_an_older_database_says_to_migrate(db_path: Path) -> None:
    await make_store(db_path)
    digest = sha256(db_path)
    b = SQLiteBackend(db_path, read_only=True, migrations=(*MIGRATIONS, extra_migration()))
    with pytest.raises(SchemaVersionError, match="migrate"):
        await b.open()
    assert sha256(db_path) == digest
    assert stored_version(db_path) == str(LATEST)


async def test_read_only_open_of_an_empty_file_says_to_migrate(db_path: Path) -> None:
    write(db_path, b"")
    with pytest.raises(SchemaVersionError, match="migrate"):
        await SQLiteBackend(db_path, read_only=True).open()
    assert size(db_path) == 0


async def test_operations_on_a_closed_backend_are_store_errors(db_path: Path) -> None:
    b = SQLiteBackend(db_path)
    with pytest.raises(StoreError, match="not open"):
        await b.get_session("s1")
    await b.open()
    await b.close()
    with pytest.raises(StoreError, match="not open"):
        await b.count_sessions()


# -- SQLite: someone else's database -----------------------------------------------------


async def test_a_foreign_file_is_refused_untouched(db_path: Path) -> None:
    execute(
        db_path,
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)",
        "INSERT INTO customers VALUES (1, 'Ada')",
    )
    digest = sha256(db_path)
    with pytest.raises(ForeignDatabaseError) as info:
        await SQLiteBackend(db_path).open()
    message = str(info.value)
    assert str(db_path) in message
    assert "customers" in message
    assert "adopt=True" in message
    assert isinstance(info.value, StoreError)
    # Nothing added, not even the journal mode switched.
    assert sha256(db_path) == digest
    assert tables(db_path) == {"customers"}


async def test_a_foreign_file_is_used_when_adopted(db_path: Path) -> None:
    execute(db_path, "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    execute(db_path, "INSERT INTO customers VALUES (1, 'Ada')")
    b = SQLiteBackend(db_path, adopt=True)
    await b.open()
    await b.close()
    assert {"customers", "sessions", "metadata"} <= tables(db_path)
    assert query(db_path, "SELECT name FROM customers") == [("Ada",)]
    # Adopted once, it carries our version: a plain open needs no flag any more.
    b = SQLiteBackend(db_path)
    await b.open()
    await b.close()


async def test_an_empty_file_is_not_foreign(db_path: Path) -> None:
    write(db_path, b"")
    assert await opened_version(db_path) == LATEST


async def test_queries_touching_the_dropped_indexes_stay_indexed(db_path: Path) -> None:
    """EXPLAIN QUERY PLAN at the latest schema: response_facts filtered by time or session
    reads a range of requests (not every response), retention and `turns` use theirs."""
    from aiohttp_session_store.backends.dialect import SQLITE
    from aiohttp_session_store.backends.queries import queries_for

    b = SQLiteBackend(db_path)
    await b.open()
    await b.close()
    q = queries_for(SQLITE)

    def plan(sql: str, params: tuple[object, ...]) -> str:
        return " | ".join(
            str(row[3]) for row in query(db_path, "EXPLAIN QUERY PLAN " + sql, params)
        )

    facts = q.fact_select + " WHERE q.timestamp >= ? ORDER BY r.timestamp, r.id"
    assert "SEARCH q USING INDEX idx_requests_timestamp (timestamp>?)" in plan(facts, (T0,))
    facts = q.fact_select + " WHERE q.session_id = ? ORDER BY r.timestamp, r.id"
    assert "USING INDEX idx_requests_session_id (session_id=?)" in plan(facts, ("s",))
    assert "idx_responses_request_id (request_id=?)" in plan(facts, ("s",))
    old = plan(q.old_request_ids, (T0, T0, 10))
    assert "idx_requests_timestamp (timestamp<?)" in old
    turns = plan("SELECT turns FROM sessions_view WHERE id = ?", ("s",))
    assert "idx_responses_session_id (session_id=?)" in turns
