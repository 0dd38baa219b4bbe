"""Every statement the SQL core sends, built once per dialect from the column lists.

Only fixed fragments go into the SQL text; every value is a bound parameter (`Binder`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..models import SESSION_ORDERS, RequestQuery, SessionOrder, SessionQuery
from .codecs import LINEAGE, REQUESTS, RESPONSES, SESSIONS
from .columns import MUTABLE_RESPONSE_COLUMNS
from .dialect import Binder, Dialect

__all__ = ("Queries", "list_sessions_sql", "page_sql", "queries_for", "request_where")


@dataclass(frozen=True, slots=True)
class Queries:
    get_session: str
    insert_session: str
    upsert_session: str
    touch_session: str
    advance_session: str
    apply_change: str
    set_chat_id: str
    delete_session: str
    delete_session_if_expired: str
    expired_ids: str
    delete_sessions_in: str
    clear_sessions: str
    count_sessions: str
    count_active_sessions: str
    insert_request: str
    update_upstream: str
    insert_response: str
    set_response_models: str
    old_request_ids: str
    delete_responses_in: str
    delete_requests_in: str
    exchange_select: str
    fact_select: str
    session_orders: dict[SessionOrder, str]
    read_version: str
    upsert_version: str
    insert_lineage: str
    get_lineage_in: str
    list_lineage: str
    delete_lineage_before: str


def _session_orders(d: Dialect) -> dict[SessionOrder, str]:
    """The only ORDER BY clauses `list_sessions` ever sends; `id` breaks ties so pages are
    stable, and sessions created in the same millisecond keep their creation order."""
    asc, desc = f"id{d.collate} ASC", f"id{d.collate} DESC"
    orders: dict[SessionOrder, str] = {
        "created_at_desc": f"created_at DESC, {d.creation_seq} DESC",
        "created_at_asc": f"created_at ASC, {d.creation_seq} ASC",
        "last_accessed_desc": f"last_accessed DESC, {desc}",
        "last_accessed_asc": f"last_accessed ASC, {asc}",
        "expires_at_desc": f"expires_at DESC, {desc}",
        "expires_at_asc": f"expires_at ASC, {asc}",
        "message_count_desc": f"message_count DESC, created_at DESC, {desc}",
    }
    if set(orders) != set(SESSION_ORDERS):  # pragma: no cover - caught by the first query
        raise RuntimeError("session orders drifted from models.SESSION_ORDERS")
    return orders


@functools.cache
def queries_for(d: Dialect) -> Queries:
    s_cols = SESSIONS.names
    s_excluded = ", ".join(f"{c} = excluded.{c}" for c in SESSIONS.columns[1:])
    s_insert = f"INSERT INTO sessions ({s_cols}) VALUES ({d.values(len(SESSIONS.columns))})"
    # Retention: the oldest `limit` requests before the cutoff, chosen once per transaction.
    # Only requests whose call has ended (a response row exists) qualify: deleting the
    # request of a call still in flight would leave its response nothing to reference. A
    # request with no response a day past the cutoff is an orphan (a crash lost its
    # response) and goes too.
    old_requests = d.sql(
        "SELECT request_id FROM requests WHERE timestamp < {} AND (timestamp < {} OR EXISTS"
        " (SELECT 1 FROM responses r WHERE r.request_id = requests.request_id))"
        " ORDER BY timestamp, id LIMIT {}"
    )
    return Queries(
        get_session=d.sql(f"SELECT {s_cols} FROM sessions WHERE id = {{}}"),
        # One statement decides "new or existing": a live row wins untouched (the WHERE
        # fails, nothing is returned), an expired one is replaced whole, as if swept first.
        # Row locking on the conflict makes two instances creating one id at once end with
        # one row and exactly one RETURNING.
        insert_session=f"{s_insert} ON CONFLICT (id) DO UPDATE SET {s_excluded}"
        " WHERE sessions.expires_at <= excluded.created_at",
        # Write-behind snapshots from the writer: last state wins.
        upsert_session=f"{s_insert} ON CONFLICT (id) DO UPDATE SET {s_excluded}",
        touch_session=d.sql(
            "UPDATE sessions SET last_accessed = {}, expires_at = {} WHERE id = {}"
            " AND expires_at > {}"
        ),
        # The increment happens in SQL (the row lock queues concurrent turns), so no turn
        # is lost to a read-modify-write, even across instances.
        advance_session=d.sql(
            "UPDATE sessions SET parent_id = {}, last_accessed = {}, expires_at = {},"
            " message_count = message_count + 1 WHERE id = {} AND expires_at > {}"
        ),
        # A shared store's change written behind (`SessionChange`): atomic like the above,
        # times never moved back, and only on the row it was made on (`created_at`): a row
        # that expired and was replaced since is another session.
        apply_change=d.sql(
            "UPDATE sessions SET parent_id = CASE WHEN {} = 1 THEN {} ELSE parent_id END,"
            " chat_id = CASE WHEN {} = 1 THEN {} ELSE chat_id END,"
            " message_count = message_count + {},"
            f" last_accessed = {d.greatest}(last_accessed, {{}}),"
            f" expires_at = {d.greatest}(expires_at, {{}})"
            " WHERE id = {} AND created_at = {}"
        ),
        set_chat_id=d.sql(
            "UPDATE sessions SET chat_id = {}, last_accessed = {} WHERE id = {} AND expires_at > {}"
        ),
        delete_session=d.sql("DELETE FROM sessions WHERE id = {}"),
        delete_session_if_expired=d.sql("DELETE FROM sessions WHERE id = {} AND expires_at <= {}"),
        # Sweeps are bounded so one never holds locks for long; the index on expires_at
        # makes this a range scan.
        expired_ids=d.sql(
            "SELECT id FROM sessions WHERE expires_at <= {}"
            f" ORDER BY expires_at, id{d.collate} LIMIT {{}}{d.skip_locked}"
        ),
        delete_sessions_in="DELETE FROM sessions WHERE " + d.any_of("id", d.placeholder(1)),
        clear_sessions="DELETE FROM sessions",
        count_sessions="SELECT count(*) FROM sessions",
        count_active_sessions=d.sql("SELECT count(*) FROM sessions WHERE expires_at > {}"),
        # ON CONFLICT DO NOTHING rather than INSERT OR IGNORE: both make a replayed batch
        # harmless, but OR IGNORE would also silently drop a row breaking NOT NULL.
        insert_request=f"INSERT INTO requests ({REQUESTS.names})"
        f" VALUES ({d.values(len(REQUESTS.columns))}) ON CONFLICT (request_id) DO NOTHING",
        update_upstream=d.sql("UPDATE requests SET upstream_request = {} WHERE request_id = {}"),
        # An upsert: sync durability records a stream's reply before its end is sent, then
        # again, under the same response_id, with what the handler did after it.
        insert_response=f"INSERT INTO responses ({RESPONSES.names})"
        f" VALUES ({d.values(len(RESPONSES.columns))}) ON CONFLICT (response_id) DO UPDATE SET "
        + ", ".join(f"{c} = excluded.{c}" for c in MUTABLE_RESPONSE_COLUMNS),
        # (response_id list): copy each response's model from its request, in the batch's
        # transaction (migrations.py, version 6: what statistics group by without a join).
        set_response_models="UPDATE responses SET model ="
        " (SELECT q.model FROM requests q WHERE q.request_id = responses.request_id) WHERE "
        + d.any_of("response_id", d.placeholder(1)),
        old_request_ids=old_requests + d.skip_locked,
        delete_responses_in="DELETE FROM responses WHERE "
        + d.any_of("request_id", d.placeholder(1)),
        delete_requests_in="DELETE FROM requests WHERE " + d.any_of("request_id", d.placeholder(1)),
        # A request, then its response. A request normally has one response; joining on the
        # first one written means a duplicate could never list the request twice.
        exchange_select=f"SELECT {REQUESTS.prefixed('q')}, {RESPONSES.prefixed('r')}"
        " FROM requests q LEFT JOIN responses r ON r.id ="
        " (SELECT min(id) FROM responses WHERE responses.request_id = q.request_id)",
        fact_select="SELECT r.session_id, q.model, r.outcome, r.prompt_tokens,"
        " r.completion_tokens, r.total_tokens, r.duration_ms, r.first_byte_ms"
        " FROM responses r JOIN requests q ON q.request_id = r.request_id",
        session_orders=_session_orders(d),
        read_version=d.sql("SELECT value FROM metadata WHERE key = {}"),
        upsert_version=d.sql(
            "INSERT INTO metadata (key, value, updated_at) VALUES ({}, {}, {})"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
            " updated_at = excluded.updated_at"
        ),
        # Content-addressed and immutable: the first node stored under a hash is kept.
        insert_lineage=f"INSERT INTO lineage ({LINEAGE.names})"
        f" VALUES ({d.values(len(LINEAGE.columns))}) ON CONFLICT (hash) DO NOTHING",
        get_lineage_in=f"SELECT {LINEAGE.names} FROM lineage WHERE "
        + d.any_of("hash", d.placeholder(1)),
        list_lineage=d.sql(
            f"SELECT {LINEAGE.names} FROM lineage WHERE session_id = {{}}"
            f" ORDER BY created_at, depth, hash{d.collate}"
        ),
        delete_lineage_before=d.sql(
            "DELETE FROM lineage WHERE hash IN (SELECT hash FROM lineage WHERE created_at < {}"
            f" ORDER BY created_at, hash{d.collate} LIMIT {{}}{d.skip_locked})"
        ),
    )


def request_where(query: RequestQuery, bind: Binder) -> str:
    """The WHERE clause (or "") of `query` over `requests q`.

    `since` is inclusive and `until` exclusive, so adjacent windows never overlap.
    """
    clauses: list[str] = []
    if query.session_id is not None:
        clauses.append(f"q.session_id = {bind(query.session_id)}")
    if query.model is not None:
        clauses.append(f"q.model = {bind(query.model)}")
    if query.stream is not None:
        clauses.append(f"q.stream = {bind(1 if query.stream else 0)}")
    if query.since is not None:
        clauses.append(f"q.timestamp >= {bind(query.since)}")
    if query.until is not None:
        clauses.append(f"q.timestamp < {bind(query.until)}")
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def page_sql(limit: int | None, offset: int, bind: Binder, unlimited: int | None) -> str:
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, not {limit}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    return f" LIMIT {bind(unlimited if limit is None else limit)} OFFSET {bind(offset)}"


def list_sessions_sql(query: SessionQuery, d: Dialect) -> tuple[str, list[object]]:
    order = queries_for(d).session_orders.get(query.order)
    if order is None:
        raise ValueError(f"unknown session order {query.order!r}: one of {SESSION_ORDERS}")
    bind = Binder(d)
    if query.state == "all":
        where = ""
    elif query.state == "active":
        where = f" WHERE expires_at > {bind(query.now)}"
    elif query.state == "expired":
        where = f" WHERE expires_at <= {bind(query.now)}"
    else:
        raise ValueError(f"unknown session state {query.state!r}: all, active or expired")
    page = page_sql(query.limit, query.offset, bind, d.unlimited)
    return f"SELECT {SESSIONS.names} FROM sessions{where} ORDER BY {order}{page}", bind.params
