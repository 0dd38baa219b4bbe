"""The schema's history: an ordered registry of migrations, one statement list per dialect.

Backends apply these in version order, each migration and the version bump in `metadata` in
one transaction, so a failing migration leaves nothing half-done. The version lives under
`SCHEMA_VERSION_KEY`, a key of this package's own, so another program sharing the database
and its own `metadata` rows cannot collide with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = (
    "LEAN_INDEXES_VERSION",
    "MIGRATIONS",
    "RESPONSE_MODEL_VERSION",
    "SCHEMA_VERSION_KEY",
    "Migration",
    "latest_version",
)

SCHEMA_VERSION_KEY: Final = "aiohttp_session_store.schema_version"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]
    #: A step the backend runs after the statements, in the same transaction, for work SQL
    #: alone cannot do the same way on both databases (indexing text held in JSON bodies).
    backfill: str | None = None


# The DDL of both dialects, written once. `{serial}` is a table's own row id (SQLite's rowid
# alias, a PostgreSQL sequence) and `{int64}` a 64-bit integer: millisecond timestamps
# outgrow PostgreSQL's 32-bit INTEGER, while SQLite's INTEGER holds 64 bits already.
_TYPES: Final = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY", "int64": "INTEGER"},
    "postgres": {"serial": "BIGSERIAL PRIMARY KEY", "int64": "BIGINT"},
}


def _render(statements: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """One statement list per dialect from dialect-neutral templates."""
    return {name: tuple(s.format(**types) for s in statements) for name, types in _TYPES.items()}


_INITIAL: Final = _render(
    (
        # One row per conversation: the upstream chat it maps to and the parent of the next turn.
        """CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        chat_id TEXT,
        parent_id TEXT,
        first_user_message TEXT NOT NULL,
        message_count INTEGER NOT NULL DEFAULT 0,
        created_at {int64} NOT NULL,
        last_accessed {int64} NOT NULL,
        expires_at {int64} NOT NULL
    )""",
        # Sweeps delete `expires_at <= now` in bounded batches: this index makes each batch a
        # range scan instead of a full table scan.
        "CREATE INDEX idx_sessions_expires_at ON sessions (expires_at)",
        # Finding the session of an upstream chat (operators debugging an upstream id).
        "CREATE INDEX idx_sessions_chat_id ON sessions (chat_id)",
        # Listings are newest first.
        "CREATE INDEX idx_sessions_created_at ON sessions (created_at)",
        # One row per call, as the client sent it; outlives its session (no foreign key to it).
        """CREATE TABLE requests (
        id {serial},
        request_id TEXT NOT NULL UNIQUE,
        session_id TEXT,
        timestamp {int64} NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        model TEXT,
        stream INTEGER NOT NULL,
        openai_request TEXT,
        upstream_request TEXT,
        headers TEXT,
        created_at {int64} NOT NULL
    )""",
        # A session's transcript (CLI `show`, query app) without scanning every request.
        "CREATE INDEX idx_requests_session_id ON requests (session_id, timestamp)",
        # Time filters (`--since`) and retention sweeps.
        "CREATE INDEX idx_requests_timestamp ON requests (timestamp)",
        # One row per call, how it ended; references its request so neither can dangle.
        """CREATE TABLE responses (
        id {serial},
        response_id TEXT NOT NULL UNIQUE,
        request_id TEXT NOT NULL REFERENCES requests(request_id),
        session_id TEXT,
        timestamp {int64} NOT NULL,
        status_code INTEGER,
        outcome TEXT NOT NULL,
        openai_response TEXT,
        upstream_response TEXT,
        parent_id TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        total_tokens INTEGER,
        finish_reason TEXT,
        error TEXT,
        duration_ms INTEGER NOT NULL,
        first_byte_ms INTEGER,
        created_at {int64} NOT NULL
    )""",
        # Joining a request to its response, and deleting responses before their requests.
        "CREATE INDEX idx_responses_request_id ON responses (request_id)",
        # Per-session statistics.
        "CREATE INDEX idx_responses_session_id ON responses (session_id)",
        # Time-bounded statistics.
        "CREATE INDEX idx_responses_timestamp ON responses (timestamp)",
    )
)

# Bookkeeping must exist before any migration can record itself, so `metadata` is created
# by the backend outside the registry (CREATE TABLE IF NOT EXISTS); its DDL lives here too.
# It holds the schema version (and any later package-level settings), keyed by name.
METADATA_DDL: Final = {
    name: ddl[0]
    for name, ddl in _render(
        (
            "CREATE TABLE IF NOT EXISTS metadata ("
            " key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at {int64} NOT NULL)",
        )
    ).items()
}

# Content-addressed conversation lineage that outlives session expiry: each node is a point
# of a conversation the upstream has seen, keyed by the chain hash of its messages, so a
# client resending a history (after its session expired, or without any session) finds the
# upstream node it continues. Nodes are immutable: the first stored under a hash is kept.
_LINEAGE: Final = _render(
    (
        """CREATE TABLE lineage (
        hash TEXT PRIMARY KEY,
        scope TEXT NOT NULL,
        session_id TEXT,
        chat_id TEXT,
        node_id TEXT NOT NULL,
        response_id TEXT,
        depth INTEGER NOT NULL,
        parent_hash TEXT,
        created_at {int64} NOT NULL
    )""",
        # A session's conversation tree (list_lineage_nodes).
        "CREATE INDEX idx_lineage_session_id ON lineage (session_id)",
        # Retention deletes the oldest nodes in bounded batches: a range scan.
        "CREATE INDEX idx_lineage_created_at ON lineage (created_at)",
    )
)

# Full-text search over what was said (15.3). One document per request, keyed by the
# request's own integer id: `prompt` is what the request added to its conversation, `reply`
# the reply's text and the call's error (backends/searchtext.py decides both, in Python, so
# the writer, this migration's backfill and every database index the same text). SQLite
# keeps it in an FTS5 table (its rowid is the key); PostgreSQL in a table whose tsvector is
# generated from the two texts, under a GIN index. The 'simple' configuration and FTS5's
# unicode61 tokenizer both split on non-letters and stem nothing, so the two databases find
# the same rows for the same words, whatever language a conversation is in.
_SEARCH_SQLITE: Final = (
    "CREATE VIRTUAL TABLE search_docs USING fts5(prompt, reply,"
    " tokenize = 'unicode61 remove_diacritics 2')",
)
_SEARCH_POSTGRES: Final = (
    """CREATE TABLE search_docs (
        id BIGINT PRIMARY KEY,
        prompt TEXT NOT NULL,
        reply TEXT NOT NULL,
        document tsvector GENERATED ALWAYS AS
            (to_tsvector('simple', prompt || ' ' || reply)) STORED
    )""",
    "CREATE INDEX idx_search_docs_document ON search_docs USING GIN (document)",
)


def _iso(column: str) -> dict[str, str]:
    """`column` (epoch milliseconds) as ISO 8601 UTC text, e.g. 2026-11-30T22:28:35.123Z."""
    return {
        "sqlite": f"strftime('%Y-%m-%dT%H:%M:%fZ', {column} / 1000.0, 'unixepoch')",
        "postgres": f"to_char(to_timestamp({column} / 1000.0) AT TIME ZONE 'UTC',"
        ' \'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"\')',
    }


def _views() -> dict[str, tuple[str, ...]]:
    """Readable views (15.5) for people using sqlite3, psql or datasette: ISO times, and a
    session's `turns`.

    `turns` counts the session's responses that completed. `message_count` only moves when
    a handler calls update_parent_id, so it stays 0 for a proxy that never does (most
    stateless ones); counting completed calls is right for every proxy, needs no write on
    the request path and cannot drift from the records. It counts the records still kept:
    retention lowers it.
    """
    out: dict[str, tuple[str, ...]] = {}
    for name in ("sqlite", "postgres"):
        t = {c: _iso(c)[name] for c in ("created_at", "last_accessed", "expires_at", "timestamp")}
        out[name] = (
            f"""CREATE VIEW sessions_view AS SELECT id, chat_id, parent_id, first_user_message,
            message_count,
            (SELECT count(*) FROM responses r WHERE r.session_id = sessions.id
                AND r.outcome = 'completed') AS turns,
            {t["created_at"]} AS created_at, {t["last_accessed"]} AS last_accessed,
            {t["expires_at"]} AS expires_at
            FROM sessions""",
            f"""CREATE VIEW requests_view AS SELECT request_id, session_id,
            {t["timestamp"]} AS time, method, path, model, stream, openai_request
            FROM requests""",
            f"""CREATE VIEW responses_view AS SELECT response_id, request_id, session_id,
            {t["timestamp"]} AS time, status_code, outcome, finish_reason, prompt_tokens,
            completion_tokens, total_tokens, duration_ms, first_byte_ms, error, openai_response
            FROM responses""",
        )
    # Id prefixes are looked up as a range (`id >= prefix AND id < next`) compared by code
    # point. SQLite's indexes already compare so (BINARY); PostgreSQL's follow the
    # database's collation, so ranges under COLLATE "C" need indexes of their own.
    out["postgres"] += (
        'CREATE INDEX idx_sessions_id_c ON sessions (id COLLATE "C")',
        'CREATE INDEX idx_requests_request_id_c ON requests (request_id COLLATE "C")',
        'CREATE INDEX idx_requests_session_id_c ON requests (session_id COLLATE "C")',
    )
    return out


_VIEWS: Final = _views()

#: The migration that gives each response its request's model (the writer fills it from then on).
RESPONSE_MODEL_VERSION: Final = 6

# Statistics (15.4: over 1M responses in under 2 s). They group every response by its
# request's model: joining 1M responses to their requests and sorting them by (model, value)
# in SQLite's sorter took ~6 s. A copy of the model on the response (requests never change
# after they are written, so it cannot drift) lets both groupings be an index-only scan in
# the order they are grouped by: no join, no sort (under 1 s). PostgreSQL, given the column,
# hash-aggregates a scan of responses alone; it does not get the indexes, which would only
# slow its writes.
_RESPONSE_MODEL: Final = (
    "ALTER TABLE responses ADD COLUMN model TEXT",
    "UPDATE responses SET model ="
    " (SELECT q.model FROM requests q WHERE q.request_id = responses.request_id)",
)
_RESPONSE_MODEL_INDEXES: Final = (
    # Per (model, outcome, duration): calls, token sums and the duration histogram.
    "CREATE INDEX idx_responses_model_stats ON responses"
    " (model, outcome, duration_ms, prompt_tokens, completion_tokens, total_tokens)",
    # Per (model, first byte): the time-to-first-byte histogram.
    "CREATE INDEX idx_responses_model_first_byte ON responses (model, first_byte_ms)",
)

#: The migration that drops the indexes no query needs.
LEAN_INDEXES_VERSION: Final = 7

# Every secondary index is work for the writer on every call (benchmarks/bench_indexes.py
# replays the writer's real batches under callgrind, one index dropped at a time): each costs
# it 0.2-2.5 % of its instructions. These two serve no query the package sends, so they go:
_LEAN_INDEXES: Final = (
    # No statement looks a session up by its upstream chat (set_chat_id finds it by id); an
    # operator's ad hoc `WHERE chat_id = ...` scans one row per conversation instead.
    # 0.7 % (JSON) / 1.1 % (SSE) of the writer's instructions per call.
    "DROP INDEX idx_sessions_chat_id",
    # Statistics filter on the request (its time, session, model), not the response's time,
    # and group by model through the migration-6 indexes. The one ordered read
    # (response_facts, the viewer's filtered sessions) walked every response in its order
    # even for a short `since`; without it that is a range of idx_requests_timestamp and
    # only the rows matched are sorted. On 100k calls: the last 1,000 calls 203 -> 4.8 ms,
    # one model of three 289 -> 177 ms, all calls 356 -> 406 ms (a sort instead of an
    # index walk). 0.4 % / 0.6 % of the writer's instructions.
    "DROP INDEX idx_responses_timestamp",
)
# Kept, each because a tool needs it: expires_at (sweeps), created_at (listings),
# requests (session, timestamp) and timestamp (transcripts, --since, retention, export
# pages), responses request_id (every exchange join, retention), responses session_id
# (sessions_view's `turns`, a correlated count per session: without it the view is quadratic),
# the migration-6 stats indexes (stats on 1M calls under 1 s), lineage session_id and
# created_at (tree, retention). The foreign key stays too: 0.4 % of the writer's instructions
# on SQLite, and it keeps retention from deleting a request before its response.

MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "initial schema", _INITIAL["sqlite"], _INITIAL["postgres"]),
    Migration(
        2,
        "session creation order",
        # SQLite already has one: the rowid, which an upsert keeps.
        (),
        (
            # Sessions created in the same millisecond still list newest first: PostgreSQL
            # rows have no insertion order of their own, so this sequence gives them one.
            "ALTER TABLE sessions ADD COLUMN seq BIGSERIAL",
        ),
    ),
    Migration(3, "conversation lineage", _LINEAGE["sqlite"], _LINEAGE["postgres"]),
    # The backfill indexes every request already stored, in pages by id.
    Migration(4, "full-text search", _SEARCH_SQLITE, _SEARCH_POSTGRES, backfill="search"),
    Migration(5, "readable views and id prefixes", _VIEWS["sqlite"], _VIEWS["postgres"]),
    Migration(
        RESPONSE_MODEL_VERSION,
        "responses carry their model",
        _RESPONSE_MODEL + _RESPONSE_MODEL_INDEXES,
        _RESPONSE_MODEL,
    ),
    Migration(LEAN_INDEXES_VERSION, "drop indexes no query uses", _LEAN_INDEXES, _LEAN_INDEXES),
)


def latest_version(migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    return max((m.version for m in migrations), default=0)
