"""The SQL core's records, queries and conversation lineage, and the class both backends
extend (`SQLBackend`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Literal

from ..migrations import RESPONSE_MODEL_VERSION
from ..models import Exchange, LineageNode, RequestQuery, ResponseFact, WriteBatch
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

    async def write_batch(self, batch: WriteBatch) -> None:
        if not len(batch):
            return
        q, encode = self._q, self.dialect.encode
        # Last snapshot of an id wins (at the place of its first).
        snapshots = {s.id: s for s in batch.sessions}
        order = sorted(snapshots) if self.dialect.sorted_snapshots else list(snapshots)
        sessions = [SESSIONS.args(snapshots[k], encode) for k in order]
        deleted = sorted(set(batch.deleted_sessions))
        requests = [REQUESTS.args(r, encode) for r in batch.requests]
        upstream = [self._args(body, rid) for rid, body in batch.upstream_requests]
        responses = [RESPONSES.args(r, encode) for r in batch.responses]
        modelled = (
            self.dialect.list_param(sorted({r.response_id for r in batch.responses}))
            if responses and self._response_models
            else None
        )
        nodes = [LINEAGE.args(n, encode) for n in batch.nodes]
        # The search index, in the same transaction: a committed record is searchable.
        docs = search_docs_for(self.dialect)
        indexed = self._indexed
        prompts = [
            self._args(prompt_text(r.openai_request), r.request_id)
            for r in (batch.requests if indexed else ())
        ]
        replies = [
            self._args(reply_text(r.openai_response, r.error), r.request_id)
            for r in (batch.responses if indexed else ())
        ]

        async def write(conn: Conn) -> None:
            if sessions:
                await conn.insert_rows(q.upsert_session, sessions)
            if deleted:
                await conn.execute(q.delete_sessions_in, (self.dialect.list_param(deleted),))
            # Requests before the upstream bodies and the responses that refer to them.
            if requests:
                await conn.insert_rows(q.insert_request, requests)
            if upstream:
                await conn.executemany(q.update_upstream, upstream)
            if prompts:
                await conn.executemany(docs.insert_request, prompts)
            if responses:
                await conn.insert_rows(q.insert_response, responses)
            if modelled is not None:
                await conn.execute(q.set_response_models, (modelled,))
            if replies:
                await conn.executemany(docs.set_reply, replies)
            if nodes:
                await conn.insert_rows(q.insert_lineage, nodes)

        # Replaying a batch is harmless (keyed records, upserted snapshots): safe to retry.
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
