"""The SQL core's records, queries and conversation lineage, and the class both backends
extend (`SQLBackend`)."""

from __future__ import annotations

from collections.abc import Sequence

from ..models import Exchange, LineageNode, RequestQuery, ResponseFact, WriteBatch
from .codecs import LINEAGE, REQUESTS, RESPONSES, SESSIONS
from .columns import ORPHAN_GRACE_MS
from .core import Conn, Row, SQLCore
from .dialect import Binder
from .queries import page_sql, request_where

__all__ = ("SQLBackend",)


def _exchange(row: Row) -> Exchange:
    n = len(REQUESTS.columns)
    response = None if row[n] is None else RESPONSES.decode(row, n)
    return Exchange(request=REQUESTS.decode(row), response=response)


class SQLBackend(SQLCore):
    """Every `Backend` method over SQL; a subclass supplies connections and lifecycle."""

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
        nodes = [LINEAGE.args(n, encode) for n in batch.nodes]

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
            if responses:
                await conn.insert_rows(q.insert_response, responses)
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
            # Responses first: they reference their request.
            await conn.execute(q.delete_responses_in, (chosen,))
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
