"""SessionManager: the 18-method session API of the Node.js proxy it replaces.

The manager checks arguments, keeps the counters, the writer, the sweeper and the
lifecycle; how sessions are stored is one strategy chosen at construction from the
backend (see `strategies`): write-behind for a store one process owns; for a shared one,
one awaited statement per call with turns written behind by atomic SQL (`shared_behind`),
or every change awaited in sync durability. At the 400-line guide: the 18 methods are one
public surface, each a few lines over the strategy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Final

from .backends import backend_from_url
from .backends.base import Backend
from .config import StoreConfig
from .errors import InvalidSessionIdError, StoreWriteError
from .hashing import generate_session_id
from .lineage_index import LineageIndex
from .models import Session, SessionQuery
from .session_cache import SessionCache, cut_text
from .shared_behind import SharedBehindStrategy
from .strategies import Counters, DirectStrategy, SessionStrategy, WriteBehindStrategy
from .sweeper import Sweeper
from .turn import CURRENT_TURN, Turn, note_chat, note_reply
from .writer import RecordWriter

__all__ = ("CALL_COMMITS", "CURRENT_TURN", "CallCommits", "SessionManager", "Turn")

log: Final = logging.getLogger("aiohttp_session_store.manager")

Clock = Callable[[], int]


def _note_turn(session_id: str, parent_id: str | None) -> None:
    note_reply(session_id, parent_id)


class CallCommits:
    """One call's share of sync-durability waiting: a deadline, and whether it was missed."""

    __slots__ = ("deadline", "failed")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.failed = False


#: The commit budget of the recorded call running in this context (sync durability).
CALL_COMMITS: Final[ContextVar[CallCommits | None]] = ContextVar(
    "aiohttp_session_store.call_commits", default=None
)


def _check_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise InvalidSessionIdError("a session id must be a non-empty string")
    return session_id


class SessionManager:
    """Creates, resolves, advances and expires conversation sessions."""

    #: Longest a call waits for a sync-durability commit while storage is failing; past it
    #: the call goes on (the writer keeps retrying and counts what it drops).
    sync_commit_timeout: float = 5.0  # set from the config in __init__

    def __init__(
        self,
        database: str | os.PathLike[str] | Backend,
        *,
        config: StoreConfig | None = None,
        clock: Clock | None = None,
        cache_size: int | None = None,
    ) -> None:
        self.config = config or StoreConfig()
        self.backend = backend_from_url(database)
        cfg = self.config
        # An explicit clock= wins over the config's (kept for callers from before it had one).
        self._clock: Clock = clock if clock is not None else cfg.clock
        self.writer = RecordWriter(
            self.backend,
            flush_interval=cfg.flush_interval,
            max_pending=cfg.max_pending_records,
            max_pending_bytes=cfg.max_pending_bytes,
            max_batch_bytes=cfg.max_batch_bytes,
            close_timeout=cfg.shutdown_timeout,
            # Other instances learn a turn from its commit: don't let it linger.
            prompt_turns=self.backend.shared,
        )
        #: Which upstream node a resent history continues (see `lineage`).
        self.lineage = LineageIndex(self.backend, self.writer, max_bytes=cfg.lineage_cache_bytes)
        self.sweeper = Sweeper(self.sweep, cfg.sweep_interval)
        self._counters = Counters()
        timeout_ms = round(cfg.session_timeout * 1000)
        base = (self.backend, self._clock, timeout_ms, self._counters)
        cache = SessionCache(
            max_entries=cfg.max_cached_sessions if cache_size is None else cache_size,
            max_bytes=cfg.max_cache_bytes,
        )
        self._strategy: SessionStrategy
        if self.backend.shared and cfg.durability == "sync":
            self._strategy = DirectStrategy(*base)
        elif self.backend.shared:
            self._strategy = SharedBehindStrategy(
                *base, writer=self.writer, known=cache, commit=self.commit_bounded
            )
        else:
            self._strategy = WriteBehindStrategy(
                *base,
                writer=self.writer,
                cache=cache,
                commit=self.commit_bounded,
                sync=cfg.durability == "sync",
            )
        self._opened = False
        self._commit_late = False
        self.records_purged = 0
        self.lineage_purged = 0
        self.sync_commit_timeout = cfg.sync_commit_timeout

    @property
    def strategy(self) -> SessionStrategy:
        """How this manager stores sessions (chosen from the backend at construction)."""
        return self._strategy

    @property
    def cache(self) -> SessionCache | None:
        """The session cache of a write-behind store; None for a shared store."""
        strategy = self._strategy
        return strategy.cache if isinstance(strategy, WriteBehindStrategy) else None

    @property
    def total_created(self) -> int:
        return self._counters.total_created

    @property
    def total_cleaned(self) -> int:
        return self._counters.total_cleaned

    @property
    def sweep_errors(self) -> int:
        return self.sweeper.errors

    # -- lifecycle (beyond the 18 methods) ---------------------------------------------

    async def open(self) -> SessionManager:
        """Open the backend (migrating it) and start the writer. Idempotent."""
        if not self._opened:
            await self.backend.open()
            self._opened = True
        self.writer.start()
        return self

    @property
    def opened(self) -> bool:
        """True once the backend is open (its database was reachable and migrated)."""
        return self._opened

    async def __aenter__(self) -> SessionManager:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    async def commit_bounded(self) -> bool:
        """Wait until what was queued is committed, at most `sync_commit_timeout`.

        Inside a recorded call (sync durability) the bound is the call's, shared by all its
        commit points: once one of them timed out, the others return False at once, so a
        call waits at most `sync_commit_timeout` in all, never that much per commit point.
        """
        budget = CALL_COMMITS.get()
        timeout = self.sync_commit_timeout
        if budget is not None:
            if budget.failed:
                return False
            timeout = max(0.0, budget.deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(self.writer.flush(), timeout)
        except (asyncio.TimeoutError, StoreWriteError, RuntimeError):
            # RuntimeError: the writer is not running (the store is closing).
            if budget is not None:
                budget.failed = True
            if not self._commit_late:  # once per burst, not once per call
                self._commit_late = True
                log.warning("not committed within %ss (storage failing)", self.sync_commit_timeout)
            return False
        self._commit_late = False
        return True

    def call_commits(self) -> CallCommits:
        """A commit budget for one call (see `commit_bounded`); set it in `CALL_COMMITS`."""
        deadline = asyncio.get_running_loop().time() + self.sync_commit_timeout
        return CallCommits(deadline)

    def _first(self, first_user_message: str | None) -> str:
        # Held in memory for the session's lifetime: bounded in bytes. The id was derived
        # from the whole text before it got here; this is only the key's preimage.
        return cut_text(first_user_message or "", self.config.max_first_message_bytes)

    # -- the 18 methods --------------------------------------------------------------------

    @staticmethod
    def generate_session_id(message: object) -> str:
        """Lowercase hex MD5 of the message's UTF-8 bytes (ValueError if empty/not a str)."""
        return generate_session_id(message)

    async def create_session(
        self,
        session_id: str,
        chat_id: str | None = None,
        first_user_message: str | None = None,
    ) -> Session:
        """A new session (`is_new` True); an existing live id is returned as it is."""
        _check_id(session_id)
        return await self._strategy.create(session_id, chat_id, self._first(first_user_message))

    async def resolve_session(
        self, session_id: str, first_user_message: str | None = None
    ) -> Session:
        """The live session (expiry slid), or a new one (`is_new`): what each call needs.

        `get_session` then `create_session` in one step: a cache miss reads the database
        once, not twice, and no await separates the read from the create.
        """
        _check_id(session_id)
        return await self._strategy.resolve(session_id, self._first(first_user_message))

    async def get_session(self, session_id: str) -> Session | None:
        """The live session, its expiry slid; None (and the row deleted) if expired."""
        _check_id(session_id)
        return await self._strategy.get(session_id)

    async def update_session(self, session_id: str, parent_id: str | None) -> bool:
        """Set the parent of the next turn and count the turn; False if missing/expired."""
        _check_id(session_id)
        if not await self._strategy.advance(session_id, parent_id):
            return False
        _note_turn(session_id, parent_id)
        await self._strategy.after_advance()
        return True

    async def update_parent_id(self, session_id: str, parent_id: str | None) -> bool:
        """The same as `update_session` (the origin API had both names)."""
        return await self.update_session(session_id, parent_id)

    async def set_chat_id(self, session_id: str, chat_id: str | None) -> bool:
        _check_id(session_id)
        note_chat(session_id, chat_id)
        return await self._strategy.set_chat_id(session_id, chat_id)

    async def delete_session(self, session_id: str) -> bool:
        """Delete the session row; its request/response records stay."""
        _check_id(session_id)
        return await self._strategy.delete(session_id)

    async def is_new_session(self, session_id: str) -> bool:
        return await self.get_session(session_id) is None

    async def get_parent_id(self, session_id: str) -> str | None:
        session = await self.get_session(session_id)
        return session.parent_id if session else None

    async def cleanup(self) -> int:
        """Delete expired sessions in bounded batches; return how many went."""
        await self._strategy.settle()
        now = self._clock()
        deleted = 0
        batch = self.config.sweep_batch_size
        while True:
            ids = await self.backend.delete_expired_sessions(now, batch)
            self._strategy.swept(ids, now)
            deleted += len(ids)
            if len(ids) < batch:
                break
            # Yield between batches so a large sweep never stalls the proxy.
            await asyncio.sleep(0)
        self._counters.total_cleaned += deleted
        return deleted

    async def _purge_before(
        self, retention: float | None, delete: Callable[[int, int], Awaitable[int]]
    ) -> tuple[int, int]:
        """Run `delete(cutoff, batch)` in bounded batches; (rows deleted, cutoff)."""
        if retention is None:
            return 0, 0
        await self._strategy.settle()
        cutoff = self._clock() - round(retention * 1000)
        purged = 0
        batch = self.config.sweep_batch_size
        while True:
            n = await delete(cutoff, batch)
            purged += n
            if n < batch:
                return purged, cutoff
            # Yield between batches so a large purge never stalls the proxy.
            await asyncio.sleep(0)

    async def purge_records(self, retention: float | None = None) -> int:
        """Delete request/response records older than `retention` seconds (default: config)."""
        retention = self.config.log_retention if retention is None else retention
        purged, _ = await self._purge_before(retention, self.backend.delete_records_before)
        self.records_purged += purged
        return purged

    async def purge_lineage(self, retention: float | None = None) -> int:
        """Forget conversation points older than `retention` seconds (default: config).

        A client resending a history whose points were forgotten starts a new upstream chat
        with its whole history: nothing goes wrong, it only costs the upstream more tokens.
        """
        retention = self.config.lineage_retention if retention is None else retention
        purged, cutoff = await self._purge_before(retention, self.backend.delete_lineage_before)
        if retention is not None:
            self.lineage.forget_before(cutoff)
        self.lineage_purged += purged
        return purged

    async def sweep(self) -> tuple[int, int]:
        """One sweep: expired sessions, records and lineage past retention.

        Returns (sessions, records) deleted.
        """
        sessions, records = await self.cleanup(), await self.purge_records()
        await self.purge_lineage()
        return sessions, records

    def start_cleanup(self) -> None:
        """Sweep every `sweep_interval` seconds on the running loop (idempotent)."""
        self.sweeper.start()

    def stop_cleanup(self) -> None:
        """Stop the periodic sweep (idempotent)."""
        self.sweeper.stop()

    @property
    def cleanup_running(self) -> bool:
        return self.sweeper.running

    async def shutdown(self) -> None:
        """Stop the timer, commit pending writes and close the backend; rows stay."""
        await self.sweeper.close()
        await self.writer.close()
        if self._opened:
            self._opened = False
            await self.backend.close()
        self._strategy.forget_all()

    async def get_metrics(self) -> dict[str, int]:
        # Metrics are how a failing disk is noticed: a short, bounded wait for the queue.
        if not self.backend.shared and self.writer.running:
            with contextlib.suppress(asyncio.TimeoutError, StoreWriteError):
                await asyncio.wait_for(self.writer.flush(), 4 * self.config.flush_interval)
        now = self._clock()
        return {
            "active_sessions": await self.backend.count_sessions(active_at=now),
            "total_sessions": await self.backend.count_sessions(),
            "total_created": self.total_created,
            "total_cleaned": self.total_cleaned,
            "records_written": self.writer.records_written,
            "records_pending": self.writer.pending,
            "records_dropped": self.writer.records_dropped,
            "write_errors": self.writer.write_errors,
            "records_purged": self.records_purged,
            "sweep_errors": self.sweep_errors,
        }

    async def get_active_sessions(self) -> list[str]:
        """Ids of sessions not expired, newest first."""
        await self._strategy.settle()
        query = SessionQuery(state="active", now=self._clock(), order="created_at_desc")
        return [s.id for s in await self.backend.list_sessions(query)]

    async def get_session_count(self) -> int:
        await self._strategy.settle()
        return await self.backend.count_sessions(active_at=self._clock())

    async def get_all_sessions(self) -> list[tuple[str, Session]]:
        """Every session row (expired ones not yet swept included), newest first."""
        await self._strategy.settle()
        sessions = await self.backend.list_sessions(SessionQuery(order="created_at_desc"))
        return [(s.id, s) for s in sessions]

    async def clear_all(self) -> int:
        """Delete every session (never records); return how many."""
        await self._strategy.settle()
        self._strategy.forget_all()
        return await self.backend.clear_sessions()
