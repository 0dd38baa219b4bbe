"""The SQL core's records, queries and conversation lineage, and the class both backends
extend (`SQLBackend`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal, TypeAlias

from ..migrations import RESPONSE_MODEL_VERSION
from ..models import (
    Exchange,
    LineageNode,
    RequestQuery,
    ResponseFact,
    SessionChange,
    WriteBatch,
)
from ..stats import StatsReport, report_from_rows
from .codecs import LINEAGE, REQUESTS, RESPONSES, SESSIONS
from .columns import ORPHAN_GRACE_MS
from .core import Conn, Row, SQLCore
from .dialect import Binder
from .queries import page_sql, request_where
from .reads import (
    export_page_sql,
    prefix_sql,
    search_docs_for,
    search_sql,
    stats_sql,
)
from .searchtext import SearchHit, fts5_query, prompt_text, reply_text

__all__ = ("SQLBackend",)


#: Requests indexed per statement page while migration 4 indexes an existing store.
_BACKFILL_PAGE: Final = 1000


#: One statement of a batch: how to run it ("rows": multi-row insert, "many": executemany,
#: "one": a single execution of rows[0]), its SQL and its parameter rows.
BatchStep: TypeAlias = tuple[Literal["rows", "many", "one"], str, Sequence[Sequence[object]]]


def _exchange(row: Row, start: int = 0) -> Exchange:
    n = start + len(REQUESTS.columns)
    response = None if row[n] is None else RESPONSES.decode(row, n)
    return Exchange(request=REQUESTS.decode(row, start), response=response)


class SQLBackend(SQLCore):
    """Every `Backend` method over SQL; a subclass supplies connections and lifecycle."""

    @property
    def _indexed(self) -> bool:
        """Whether this store has the search index: a backend given a migration registry
        without it (a test of an older schema) writes records as that schema had them."""
        return any(m.backfill == "search" for m in self._migrations)

    @property
    def _response_models(self) -> bool:
        """Whether responses carry their request's model (same reason as `_indexed`)."""
        return any(m.version == RESPONSE_MODEL_VERSION for m in self._migrations)

    # -- records -----------------------------------------------------------------------

    def batch_steps(self, batch: WriteBatch) -> list[BatchStep]:
        """The statements of one batch, in order, with their rows (pure: no I/O).

        A backend may build them where it runs them (SQLite: on its connection's thread).
        """
        q, encode = self._q, self.dialect.encode
        # Last snapshot of an id wins (at the place of its first).
        snapshots = {s.id: s for s in batch.sessions}
        order = sorted(snapshots) if self.dialect.sorted_snapshots else list(snapshots)
        steps: list[BatchStep] = []
        if snapshots:
            steps.append(
                ("rows", q.upsert_session, [SESSIONS.args(snapshots[k], encode) for k in order])
            )
        if batch.deleted_sessions:
            deleted = sorted(set(batch.deleted_sessions))
            steps.append(("one", q.delete_sessions_in, [(self.dialect.list_param(deleted),)]))
        # Requests before the upstream bodies and the responses that refer to them.
        if batch.requests:
            steps.append(
                ("rows", q.insert_request, [REQUESTS.args(r, encode) for r in batch.requests])
            )
        if batch.upstream_requests:
            upstream = [self._args(body, rid) for rid, body in batch.upstream_requests]
            steps.append(("many", q.update_upstream, upstream))
        # The search index, in the same transaction: a committed record is searchable.
        indexed = self._indexed
        # The last reply of each request in this batch (as setting them in turn would leave).
        replies = {r.request_id: r for r in batch.responses} if indexed else {}
        if indexed and batch.requests:
            docs = search_docs_for(self.dialect)
            whole = {
                r.request_id: self._args(
                    prompt_text(r.openai_request),
                    reply_text(replies[r.request_id].openai_response, replies[r.request_id].error),
                    r.request_id,
                )
                for r in batch.requests
                if r.request_id in replies
            }
            if whole:
                steps.append(("rows", docs.insert_documents, list(whole.values())))
            prompts = [
                self._args(prompt_text(r.openai_request), r.request_id)
                for r in batch.requests
                if r.request_id not in whole
            ]
            if prompts:
                steps.append(("many", docs.insert_request, prompts))
            for request_id in whole:
                del replies[request_id]
        if batch.responses:
            responses = [RESPONSES.args(r, encode) for r in batch.responses]
            steps.append(("rows", q.insert_response, responses))
            if self._response_models:
                # Each response carries its request's model (stats read one index).
                ids = self.dialect.list_param(sorted({r.response_id for r in batch.responses}))
                steps.append(("one", q.set_response_models, [(ids,)]))
            if replies:
                # Replies to requests committed by an earlier batch: set on their document.
                later = [
                    self._args(reply_text(r.openai_response, r.error), rid)
                    for rid, r in replies.items()
                ]
                steps.append(("many", search_docs_for(self.dialect).set_reply, later))
        if batch.nodes:
            steps.append(("rows", q.insert_lineage, [LINEAGE.args(n, encode) for n in batch.nodes]))
        if batch.changes:
            # Last, so the row locks are held only until the commit right after; in id
            # order, so two instances' batches cannot deadlock.
            changes = sorted(batch.changes, key=lambda c: c.session.id)
            steps.append(("many", q.apply_change, [self._change_args(c) for c in changes]))
        return steps

    def _change_args(self, change: SessionChange) -> list[object]:
        s = change.session
        return self._args(
            int(change.set_parent),
            s.parent_id,
            int(change.set_chat),
            s.chat_id,
            change.turns,
            change.accessed,
            change.expires_at,
            s.id,
            s.created_at,
        )

    async def write_batch(self, batch: WriteBatch) -> None:
        if not len(batch):
            return
        steps = self.batch_steps(batch)

        async def write(conn: Conn) -> None:
            for kind, sql, rows in steps:
                if kind == "rows":
                    await conn.insert_rows(sql, rows)
                elif kind == "many":
                    await conn.executemany(sql, rows)
                else:
                    await conn.execute(sql, rows[0])

        # Replaying a batch is harmless (keyed records, upserted snapshots): safe to retry.
        # Session changes are increments: a replay after a commit whose reply was lost
        # counts their turns twice (never loses one); a rolled-back batch is simply redone.
        await self._run(write, write=True, retry=True)

    async def delete_records_before(self, cutoff: int, limit: int) -> int:
        if limit <= 0:
            return 0
        q = self._q

        async def purge(conn: Conn) -> int:
            # The ids are chosen once: deleting the responses changes which requests the
            # selection would match a second time.
            rows = await conn.fetch(q.old_request_ids, (cutoff, cutoff - ORPHAN_GRACE_MS, limit))
            if not rows:
                return 0
            chosen = self.dialect.list_param([str(row[0]) for row in rows])
            # Responses first: they reference their request. The search documents are
            # found through the requests, so they go before those.
            await conn.execute(q.delete_responses_in, (chosen,))
            if self._indexed:
                await conn.execute(search_docs_for(self.dialect).delete_in, (chosen,))
            return await conn.execute(q.delete_requests_in, (chosen,))

        return await self._run(purge, write=True, retry=False)

    # -- queries -----------------------------------------------------------------------

    async def list_exchanges(self, query: RequestQuery) -> list[Exchange]:
        bind = Binder(self.dialect)
        where = request_where(query, bind)
        direction = "ASC" if query.oldest_first else "DESC"
        page = page_sql(query.limit, query.offset, bind, self.dialect.unlimited)
        sql = (
            f"{self._q.exchange_select}{where}"
            f" ORDER BY q.timestamp {direction}, q.id {direction}{page}"
        )
        return [_exchange(row) for row in await self._read(sql, bind.params)]

    async def get_exchange(self, request_id: str) -> Exchange | None:
        bind = Binder(self.dialect)
        sql = f"{self._q.exchange_select} WHERE q.request_id = {bind(request_id)}"
        rows = await self._read(sql, bind.params)
        return _exchange(rows[0]) if rows else None

    async def count_requests(self, query: RequestQuery) -> int:
        bind = Binder(self.dialect)
        where = request_where(query, bind)
        rows = await self._read(f"SELECT count(*) FROM requests q{where}", bind.params)
        return int(rows[0][0])

    async def response_facts(self, query: RequestQuery) -> list[ResponseFact]:
        # Statistics cover every match: like count_requests, limit/offset do not apply.
        bind = Binder(self.dialect)
        where = request_where(query, bind)
        sql = f"{self._q.fact_select}{where} ORDER BY r.timestamp, r.id"
        return [
            ResponseFact(
                session_id=row[0],
                model=row[1],
                outcome=str(row[2]),
                prompt_tokens=row[3],
                completion_tokens=row[4],
                total_tokens=row[5],
                duration_ms=row[6],
                first_byte_ms=row[7],
            )
            for row in await self._read(sql, bind.params)
        ]

    # -- the operator's tools ----------------------------------------------------------

    async def search(
        self,
        query: str,
        *,
        limit: int = 20,
        session_id: str | None = None,
        since: int | None = None,
    ) -> list[SearchHit]:
        sql, params = search_sql(
            self.dialect, fts5_query(query), limit=limit, session_id=session_id, since=since
        )
        rows = await self._read(sql, params)
        return [SearchHit(exchange=_exchange(row, 1), snippet=str(row[0] or "")) for row in rows]

    async def find_id_prefix(self, kind: Literal["session", "request"], prefix: str) -> list[str]:
        if not prefix:
            raise ValueError("an id prefix must not be empty")
        sql, params = prefix_sql(self.dialect, kind, prefix)
        return [str(row[0]) for row in await self._read(sql, params)]

    async def export_page(
        self, query: RequestQuery, after: tuple[int, int] | None, limit: int
    ) -> tuple[list[Exchange], tuple[int, int] | None]:
        sql, params = export_page_sql(self.dialect, query, after, limit)
        rows = await self._read(sql, params)
        if not rows:
            return [], None
        exchanges = [_exchange(row, 1) for row in rows]
        return exchanges, (int(rows[-1][1 + REQUESTS.columns.index("timestamp")]), int(rows[-1][0]))

    async def response_stats(self, query: RequestQuery) -> StatsReport:
        aggregates, first_bytes = stats_sql(
            self.dialect, query, response_models=self._response_models
        )

        async def read(conn: Conn) -> tuple[list[Row], list[Row]]:
            # One connection (SQLite: one read transaction), so both see the same rows.
            return await conn.fetch(*aggregates), await conn.fetch(*first_bytes)

        return report_from_rows(*await self._run(read, write=False, retry=True))

    async def _backfill(self, name: str, conn: Conn) -> None:
        if name != "search":
            await super()._backfill(name, conn)
            return
        docs = search_docs_for(self.dialect)
        after = 0
        while True:
            rows = await conn.fetch(docs.backfill_page, (after, _BACKFILL_PAGE))
            if not rows:
                return
            await conn.insert_rows(
                docs.backfill_insert,
                [
                    self._args(row[0], prompt_text(row[1]), reply_text(row[2], row[3]))
                    for row in rows
                ],
            )
            after = int(rows[-1][0])

    # -- conversation lineage ----------------------------------------------------------

    async def get_lineage_nodes(self, hashes: Sequence[str]) -> list[LineageNode]:
        if not hashes:
            return []
        param = self.dialect.list_param(list(dict.fromkeys(hashes)))
        return [LINEAGE.decode(row) for row in await self._read(self._q.get_lineage_in, (param,))]

    async def list_lineage_nodes(self, session_id: str) -> list[LineageNode]:
        rows = await self._read(self._q.list_lineage, self._args(session_id))
        return [LINEAGE.decode(row) for row in rows]

    async def delete_lineage_before(self, cutoff: int, limit: int) -> int:
        if limit <= 0:
            return 0
        return await self._write_count(self._q.delete_lineage_before, (cutoff, limit))
