"""The SQL of the operator's tools, written once over a `Dialect`: search, id prefixes,
export pages by key, and statistics aggregated in the database.

Like queries.py, only fixed fragments go into the SQL text; every value is bound.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final, Literal

from ..models import RequestQuery
from .codecs import REQUESTS, RESPONSES
from .dialect import Binder, Dialect
from .queries import request_where

__all__ = (
    "PREFIX_CANDIDATES",
    "SearchDocs",
    "export_page_sql",
    "prefix_sql",
    "prefix_successor",
    "search_docs_for",
    "search_sql",
    "stats_sql",
)

#: At most this many ids are named when a prefix is ambiguous.
PREFIX_CANDIDATES: Final = 10

# The first response of a request, as everywhere an exchange is read (queries.py).
_EXCHANGE_FROM: Final = (
    " JOIN requests q ON q.id = s.id LEFT JOIN responses r ON r.id ="
    " (SELECT min(id) FROM responses WHERE responses.request_id = q.request_id)"
)


@dataclass(frozen=True, slots=True)
class SearchDocs:
    """Statements keeping `search_docs` in step with the records (writer and retention)."""

    #: (prompt, request_id): a request's document, once (a replayed batch adds nothing).
    insert_request: str
    #: (prompt, reply, request_id), a VALUES group that may be repeated: documents of
    #: requests whose reply is in the same batch, written whole by one statement. FTS5
    #: flushes its pending terms at the end of every statement, and an UPDATE of the reply
    #: re-tokenises the prompt: one INSERT for a batch costs a fraction of both.
    insert_documents: str
    #: (reply, request_id): the reply side, set (again) when its response is recorded.
    set_reply: str
    #: (request_id list): the documents of requests about to be deleted.
    delete_in: str
    #: (after id, page size): requests with their first response, by id, for the backfill.
    backfill_page: str
    #: (id, prompt, reply)
    backfill_insert: str


@functools.cache
def search_docs_for(d: Dialect) -> SearchDocs:
    key = d.search_key
    return SearchDocs(
        insert_request=d.sql(
            f"INSERT INTO search_docs ({key}, prompt, reply) SELECT id, {{}}, ''"
            " FROM requests WHERE request_id = {}"
            f" AND NOT EXISTS (SELECT 1 FROM search_docs WHERE {key} = requests.id)"
        ),
        insert_documents=d.sql(
            f"INSERT INTO search_docs ({key}, prompt, reply) SELECT q.id, v.column1, v.column2"
            " FROM ( VALUES ({}, {}, {})) AS v JOIN requests q ON q.request_id = v.column3"
            f" WHERE NOT EXISTS (SELECT 1 FROM search_docs s WHERE s.{key} = q.id)"
        ),
        set_reply=d.sql(
            f"UPDATE search_docs SET reply = {{}} WHERE {key} ="
            " (SELECT id FROM requests WHERE request_id = {})"
        ),
        delete_in=f"DELETE FROM search_docs WHERE {key} IN (SELECT id FROM requests WHERE "
        + d.any_of("request_id", d.placeholder(1))
        + ")",
        backfill_page=d.sql(
            "SELECT q.id, q.openai_request, r.openai_response, r.error FROM requests q"
            " LEFT JOIN responses r ON r.id ="
            " (SELECT min(id) FROM responses WHERE responses.request_id = q.request_id)"
            " WHERE q.id > {} ORDER BY q.id LIMIT {}"
        ),
        backfill_insert=f"INSERT INTO search_docs ({key}, prompt, reply) VALUES ({d.values(3)})",
    )


def search_sql(
    d: Dialect,
    match: str,
    *,
    limit: int,
    session_id: str | None,
    since: int | None,
) -> tuple[str, list[object]]:
    """Matching exchanges, most recently recorded first, each row: snippet, request
    columns, response columns. The database picks the rows and the extract; `match` is a
    bound parameter (a `searchtext.fts5_query`)."""
    if limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit}")
    bind = Binder(d)
    # Only a fragment that names the query binds it (FTS5's snippet() needs no argument).
    snippet = d.search_snippet.format(ph=bind(match) if "{ph}" in d.search_snippet else "")
    key = f"d.{d.search_key}"
    # Placeholders are bound in the order they appear in the text ('?' is positional).
    clauses = [] if session_id is None else [f"q.session_id = {bind(session_id)}", f"{key} = q.id"]
    clauses.append(d.search_match.format(ph=bind(match)))
    if session_id is None:
        # By the document key (the request's id, in insertion order): FTS5 walks its index
        # in that order and stops at the limit instead of ranking every match.
        source = f"search_docs d JOIN requests q ON q.id = {key}"
    else:
        # One session has few calls: start from them (CROSS JOIN fixes SQLite's join order;
        # PostgreSQL reads it as a plain join and plans it itself) and test each document,
        # rather than walk every match of a common word looking for the session's.
        source = "requests q CROSS JOIN search_docs d"
    if since is not None:
        clauses.append(f"q.timestamp >= {bind(since)}")
    inner = (
        f"SELECT {key} AS id, {snippet} AS snip FROM {source} WHERE {' AND '.join(clauses)}"
        f" ORDER BY {key} DESC LIMIT {bind(limit)}"
    )
    sql = (
        f"SELECT s.snip, {REQUESTS.prefixed('q')}, {RESPONSES.prefixed('r')}"
        f" FROM ({inner}) s{_EXCHANGE_FROM} ORDER BY q.id DESC"
    )
    return sql, bind.params


def prefix_successor(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix` (by code
    point), or None when there is none (the prefix is all U+10FFFF)."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            # Skip the surrogate block: such a code point cannot be stored or compared.
            following = last + 1 if not 0xD7FF <= last < 0xDFFF else 0xE000
            return "".join(chars) + chr(following)
    return None


def prefix_sql(
    d: Dialect, kind: Literal["session", "request"], prefix: str
) -> tuple[str, list[object]]:
    """The ids starting with `prefix` (at most PREFIX_CANDIDATES + 1), as one indexed range
    scan per table: `id >= prefix AND id < successor`, compared by code point."""
    bind = Binder(d)
    c = d.collate
    upper = prefix_successor(prefix)

    def scan(column: str, table: str) -> str:
        where = f"{column}{c} >= {bind(prefix)}"
        if upper is not None:
            where += f" AND {column}{c} < {bind(upper)}"
        return (
            f"SELECT {column} AS id FROM {table} WHERE {where}"
            f" ORDER BY {column}{c} LIMIT {PREFIX_CANDIDATES + 1}"
        )

    if kind == "request":
        sql = scan("request_id", "requests")
    else:
        # A session's records outlive its row: its id is found in either place.
        sql = (
            f"SELECT DISTINCT id FROM ({scan('id', 'sessions')}) a UNION"
            f" SELECT id FROM ({scan('session_id', 'requests')}) b"
        )
        sql = f"SELECT id FROM ({sql}) u ORDER BY id{c} LIMIT {PREFIX_CANDIDATES + 1}"
    return sql, bind.params


def export_page_sql(
    d: Dialect, query: RequestQuery, after: tuple[int, int] | None, limit: int
) -> tuple[str, list[object]]:
    """One page of exchanges, oldest first, after the key (timestamp, id) of the last row
    of the previous page: each page is an index range scan, however deep the export."""
    bind = Binder(d)
    where = request_where(query, bind)
    if after is not None:
        keyset = f"(q.timestamp, q.id) > ({bind(after[0])}, {bind(after[1])})"
        where = f"{where} AND {keyset}" if where else f" WHERE {keyset}"
    sql = (
        f"SELECT q.id, {REQUESTS.prefixed('q')}, {RESPONSES.prefixed('r')} FROM requests q"
        " LEFT JOIN responses r ON r.id ="
        " (SELECT min(id) FROM responses WHERE responses.request_id = q.request_id)"
        f"{where} ORDER BY q.timestamp, q.id LIMIT {bind(limit)}"
    )
    return sql, bind.params


_FACTS: Final = "FROM responses r JOIN requests q ON q.request_id = r.request_id"
_NO_USAGE: Final = (
    "r.prompt_tokens IS NULL AND r.completion_tokens IS NULL AND r.total_tokens IS NULL"
)


def stats_sql(
    d: Dialect, query: RequestQuery, *, response_models: bool = True
) -> tuple[tuple[str, list[object]], ...]:
    """Two statements, each one pass over the matching responses:

    - per (model, outcome, duration_ms): calls, token sums, calls without usage;
    - per (model, first_byte_ms), where there is one: calls.

    Grouping by the measured value gives each model's histogram of it, from which
    `stats.report_from_rows` reads exact nearest-rank percentiles (and, adding the
    models' histograms, the overall ones) without the database sorting every call, and
    without a call's row ever reaching Python.

    When nothing but the model is filtered on and responses carry their request's model
    (`response_models`, migrations.py version 6), both read responses alone, grouped in
    the order of an index that covers them (SQLite: an index-only scan, no join, no sort).
    Other filters are on the request (its session, stream flag and time), so those read
    through the join.
    """
    alone = response_models and (
        query.session_id is None
        and query.stream is None
        and query.since is None
        and query.until is None
    )
    model, source = ("r.model", " FROM responses r") if alone else ("q.model", f" {_FACTS}")

    def where(bind: Binder) -> str:
        if not alone:
            return request_where(query, bind)
        return "" if query.model is None else f" WHERE r.model = {bind(query.model)}"

    bind = Binder(d)
    aggregates = (
        f"SELECT {model}, r.outcome, r.duration_ms, count(*), sum(r.prompt_tokens),"
        " sum(r.completion_tokens), sum(r.total_tokens),"
        f" sum(CASE WHEN {_NO_USAGE} THEN 1 ELSE 0 END){source}{where(bind)}"
        f" GROUP BY {model}, r.outcome, r.duration_ms"
    )
    first = (aggregates, bind.params)
    bind = Binder(d)
    measured = where(bind)
    measured += f"{' AND' if measured else ' WHERE'} r.first_byte_ms IS NOT NULL"
    first_bytes = (
        f"SELECT {model}, r.first_byte_ms, count(*){source}{measured}"
        f" GROUP BY {model}, r.first_byte_ms"
    )
    return first, (first_bytes, bind.params)
