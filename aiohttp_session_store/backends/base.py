"""The abstract storage interface every backend implements, in the package's own types."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Literal

from ..models import (
    Exchange,
    LineageNode,
    RequestQuery,
    RequestRecord,
    ResponseFact,
    Session,
    SessionQuery,
    WriteBatch,
)

if TYPE_CHECKING:
    from ..stats import StatsReport
    from .searchtext import SearchHit

__all__ = ("Backend",)


class Backend(abc.ABC):
    """Where sessions and records live.

    Backends speak in `Session`/`RequestRecord`/`ResponseRecord` values, never rows or
    cursors, and never apply business rules (expiry is decided by the caller, who passes
    `now`). Every method is safe to call concurrently from one event loop.
    """

    #: True when several processes may write the same store at once (PostgreSQL). The
    #: SessionManager then reads sessions from the database on every call instead of
    #: serving them from its write-behind cache, so instance B sees instance A's turn.
    shared: ClassVar[bool] = False

    #: A short name for messages and metrics ("sqlite", "postgresql").
    name: ClassVar[str] = "abstract"

    @property
    def read_only(self) -> bool:
        return False

    # -- lifecycle ---------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and apply pending migrations (read-only: check the version only).

        Raises `SchemaVersionError` for a database written by a newer version (leaving it
        untouched) and `DatabaseNotFoundError` when a read-only open finds nothing.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Idempotent."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The version recorded in `metadata` (0 for an empty database)."""

    @abc.abstractmethod
    async def pending_migrations(self) -> list[tuple[int, str]]:
        """(version, name) of the registry's migrations not yet applied."""

    @abc.abstractmethod
    async def migrate(self) -> list[tuple[int, str]]:
        """Apply pending migrations in order, each with its bookkeeping in one transaction."""

    # -- sessions ----------------------------------------------------------------------

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> Session | None:
        """The row as stored, expired or not."""

    @abc.abstractmethod
    async def insert_session(self, session: Session) -> Session:
        """Insert unless the id exists; return the stored row, `is_new` True iff inserted.

        An existing row that has expired (by `session.created_at`) is replaced, since an
        expired session is as good as gone.
        """

    @abc.abstractmethod
    async def touch_session(self, session_id: str, *, now: int, expires_at: int) -> Session | None:
        """Slide the expiry of a row not expired at `now`; None if missing or expired."""

    async def resolve_session(
        self, fresh: Session, *, synchronous: bool = True
    ) -> tuple[Session, bool]:
        """The live row of `fresh.id` slid to `fresh`'s times, else `fresh` stored (`is_new`).

        Returns (session, replaced): `replaced` is True when an expired row made way for
        `fresh` (counted as cleaned). A backend may do this in one statement; this default
        is the touch / delete-if-expired / insert sequence. `synchronous=False` lets a
        server acknowledge it before its commit is on disk (batched durability).
        """
        now = fresh.last_accessed
        live = await self.touch_session(fresh.id, now=now, expires_at=fresh.expires_at)
        if live is not None:
            return live, False
        replaced = await self.delete_session_if_expired(fresh.id, now)
        return await self.insert_session(fresh), replaced

    @abc.abstractmethod
    async def advance_session(
        self, session_id: str, parent_id: str | None, *, now: int, expires_at: int
    ) -> Session | None:
        """Set parent_id, slide the expiry and `message_count + 1` atomically.

        Only a row not expired at `now` (`expires_at > now`) is advanced; None otherwise.
        """

    @abc.abstractmethod
    async def set_chat_id(self, session_id: str, chat_id: str | None, *, now: int) -> bool:
        """Set chat_id (and last_accessed) of a row not expired at `now`; False otherwise."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> bool:
        """Delete one session row (never its records); True if a row went."""

    @abc.abstractmethod
    async def delete_session_if_expired(self, session_id: str, now: int) -> bool:
        """Delete one session only if it has expired at `now` (checked in the same statement,
        so a row another instance just revived is never lost); True if a row went."""

    @abc.abstractmethod
    async def delete_expired_sessions(self, now: int, limit: int) -> list[str]:
        """Delete at most `limit` sessions with `expires_at <= now`; return their ids."""

    @abc.abstractmethod
    async def clear_sessions(self) -> int:
        """Delete every session row (never records); return how many."""

    @abc.abstractmethod
    async def count_sessions(self, *, active_at: int | None = None) -> int:
        """All rows, or only those with `expires_at > active_at` when given."""

    @abc.abstractmethod
    async def list_sessions(self, query: SessionQuery) -> list[Session]:
        """Sessions filtered and ordered by `query` (the order is one of a fixed set)."""

    # -- records -----------------------------------------------------------------------

    @abc.abstractmethod
    async def write_batch(self, batch: WriteBatch) -> None:
        """Commit a batch in one transaction; all or nothing.

        Replaying a batch that was committed before is harmless (records are keyed by their
        ids, session snapshots are upserts), so a batch whose commit outcome is unknown can
        be retried; only a shared store's `changes` (increments) then count a turn twice.
        """

    @abc.abstractmethod
    async def delete_records_before(self, cutoff: int, limit: int) -> int:
        """Delete at most `limit` requests with `timestamp < cutoff`, and their responses.

        Returns the number of request rows deleted.
        """

    # -- queries (CLI, query app) ------------------------------------------------------

    @abc.abstractmethod
    async def list_exchanges(self, query: RequestQuery) -> list[Exchange]:
        """Requests matching `query`, each with its response (None if there is none)."""

    @abc.abstractmethod
    async def get_exchange(self, request_id: str) -> Exchange | None:
        """One request by its `request_id`, with its response."""

    @abc.abstractmethod
    async def count_requests(self, query: RequestQuery) -> int:
        """How many requests match `query` (limit/offset ignored)."""

    @abc.abstractmethod
    async def response_facts(self, query: RequestQuery) -> list[ResponseFact]:
        """Measurable fields of the responses whose request matches `query`."""

    # -- conversation lineage ----------------------------------------------------------
    # Nodes are written by `write_batch` (`batch.nodes`, insert-or-keep-first by hash).

    @abc.abstractmethod
    async def get_lineage_nodes(self, hashes: Sequence[str]) -> list[LineageNode]:
        """The stored nodes whose `hash` is one of `hashes` (one indexed query)."""

    @abc.abstractmethod
    async def list_lineage_nodes(self, session_id: str) -> list[LineageNode]:
        """Every node recorded for `session_id`, oldest first (the conversation's tree)."""

    @abc.abstractmethod
    async def delete_lineage_before(self, cutoff: int, limit: int) -> int:
        """Delete at most `limit` nodes with `created_at < cutoff`; return how many went."""

    # -- the operator's tools (search, id prefixes, export, statistics) -----------------
    # Not abstract: a backend without them still stores and serves; the SQL core has all.

    async def search(
        self,
        query: str,
        *,
        limit: int = 20,
        session_id: str | None = None,
        since: int | None = None,
    ) -> list[SearchHit]:
        """Exchanges whose messages, reply or error hold every word of `query`, most
        recently recorded first, each with an extract marking the matches in « ».

        `query` is a person's text: words and "quoted phrases", never query syntax.
        ValueError when it has no words.
        """
        raise NotImplementedError(f"the {self.name} backend has no search")

    async def find_id_prefix(self, kind: Literal["session", "request"], prefix: str) -> list[str]:
        """Session (or request) ids starting with `prefix`, in code point order; at most
        `reads.PREFIX_CANDIDATES + 1`, enough to tell unique from ambiguous."""
        raise NotImplementedError(f"the {self.name} backend has no id prefix lookup")

    async def export_page(
        self, query: RequestQuery, after: tuple[int, int] | None, limit: int
    ) -> tuple[list[Exchange], tuple[int, int] | None]:
        """Up to `limit` exchanges matching `query` (its limit, offset and order ignored),
        oldest first, after the key `after`; and the key to pass for the next page."""
        raise NotImplementedError(f"the {self.name} backend has no keyset export")

    async def response_stats(self, query: RequestQuery) -> StatsReport:
        """`stats.report` of the matching responses, computed in the database."""
        from ..stats import report

        return report(await self.response_facts(query))

    def is_permanent_error(self, exc: BaseException) -> bool:
        """True when retrying `write_batch` cannot help (a constraint or data error).

        The writer then commits the batch's items one by one and drops only the bad ones,
        instead of retrying (as it does for a full disk or a lock) forever.
        """
        return False

    async def backup(self, destination: str) -> None:
        """Write a consistent copy of the store to `destination` while it is in use."""
        raise NotImplementedError(
            f"the {self.name} backend has no built-in backup; use the database's own tools"
        )

    async def get_request(self, request_id: str) -> RequestRecord | None:
        exchange = await self.get_exchange(request_id)
        return exchange.request if exchange else None
