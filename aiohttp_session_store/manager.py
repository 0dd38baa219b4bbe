"""SessionManager: the origin proxy's 18-method session API, on a pluggable backend.

With an embedded backend (SQLite: one process owns the file) sessions are served from a
bounded in-memory cache and written behind through the record writer, so resolving and
advancing a session costs microseconds and never awaits a write in batched durability.
A session's reads still see its own writes at once: the cache, then the writer's queue,
are consulted before the database. With a shared backend (PostgreSQL: several proxy
instances) every call goes to the database, whose atomic statements keep instances
consistent (`message_count + 1` in SQL, `INSERT ... ON CONFLICT` creation).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from types import TracebackType
from typing import Final

from .backends import backend_from_url
from .backends.base import Backend
from .config import Durability, StoreConfig
from .errors import InvalidSessionIdError, StoreWriteError
from .hashing import generate_session_id
from .lineage_index import LineageIndex
from .models import Session, SessionQuery, now_ms
from .turn import CURRENT_TURN, Turn, note_chat, note_reply
from .writer import DELETED, RecordWriter

__all__ = ("CURRENT_TURN", "SessionManager", "Turn")

log: Final = logging.getLogger("aiohttp_session_store.manager")

Clock = Callable[[], int]


def _note_turn(session_id: str, parent_id: str | None) -> None:
    note_reply(session_id, parent_id)


class _Same:
    """`_fresh`'s default for a field the caller leaves as it was (None is a value)."""

    __slots__ = ()


_SAME: Final = _Same()


def _check_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not session_id:
        raise InvalidSessionIdError("a session id must be a non-empty string")
    return session_id


class SessionManager:
    """Creates, resolves, advances and expires conversation sessions."""

    def __init__(
        self,
        database: str | os.PathLike[str] | Backend,
        *,
        config: StoreConfig | None = None,
        clock: Clock = now_ms,
        cache_size: int = 100_000,
    ) -> None:
        self.config = config or StoreConfig()
        self.backend = backend_from_url(database)
        self._clock = clock
        self._timeout_ms = round(self.config.session_timeout * 1000)
        self._durability: Durability = self.config.durability
        self._cache: OrderedDict[str, Session] = OrderedDict()
        self._cache_size = cache_size
        self.writer = RecordWriter(
            self.backend,
            flush_interval=self.config.flush_interval,
            max_pending=self.config.max_pending_records,
        )
        #: Which upstream node a resent history continues (see `lineage`).
        self.lineage = LineageIndex(
            self.backend, self.writer, max_bytes=self.config.lineage_cache_bytes
        )
        self._cleanup_task: asyncio.Task[None] | None = None
        self._opened = False
        self._commit_late = False
        self.total_created = 0
        self.total_cleaned = 0
        self.records_purged = 0
        self.sweep_errors = 0

    # -- lifecycle (beyond the origin API) ---------------------------------------------

    async def open(self) -> SessionManager:
        """Open the backend (migrating it) and start the writer. Idempotent."""
        if not self._opened:
            await self.backend.open()
            self._opened = True
        self.writer.start()
        return self

    async def __aenter__(self) -> SessionManager:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    @property
    def _cached(self) -> bool:
        return not self.backend.shared

    # -- cache plumbing ------------------------------------------------------------------

    def _remember(self, session: Session) -> None:
        cache = self._cache
        cache[session.id] = session
        cache.move_to_end(session.id)
        if len(cache) > self._cache_size:
            # Safe to forget: an uncommitted snapshot is still found in the writer's queue.
            cache.popitem(last=False)

    def _known(self, session_id: str) -> tuple[bool, Session | None]:
        """(True, state) when memory knows the newest state (None: deleted), else (False, None)."""
        cached = self._cache.get(session_id)
        if cached is not None:
            return True, cached
        pending = self.writer.lookup(session_id)
        if pending is DELETED:
            return True, None
        if isinstance(pending, Session):
            return True, pending
        return False, None

    async def _load(self, session_id: str) -> Session | None:
        known, session = self._known(session_id)
        if known:
            return session
        stored = await self.backend.get_session(session_id)
        # Another coroutine may have created or changed the session while we awaited:
        # memory is then newer than what the database returned.
        known, session = self._known(session_id)
        if known:
            return session
        if stored is not None:
            self._remember(stored)
        return stored

    def _forget(self, session_id: str) -> None:
        self._cache.pop(session_id, None)
        self.writer.delete_session(session_id)

    #: Longest a call waits for a sync-durability commit while storage is failing; past it
    #: the call goes on (the writer keeps retrying and counts what it drops).
    sync_commit_timeout: float = 5.0

    async def commit_bounded(self) -> bool:
        """Wait until what was queued is committed, at most `sync_commit_timeout`."""
        try:
            await asyncio.wait_for(self.writer.flush(), self.sync_commit_timeout)
        except (asyncio.TimeoutError, StoreWriteError, RuntimeError):
            # RuntimeError: the writer is not running (the store is closing).
            if not self._commit_late:  # once per burst, not once per call
                self._commit_late = True
                log.warning("not committed within %ss (storage failing)", self.sync_commit_timeout)
            return False
        self._commit_late = False
        return True

    async def _commit(self) -> None:
        if self._durability == "sync":
            await self.commit_bounded()

    def _fresh(
        self,
        session: Session,
        now: int,
        *,
        parent_id: str | _Same | None = _SAME,
        message_count: int | None = None,
    ) -> Session:
        # Built field by field: dataclasses.replace() costs twice as much, and this runs on
        # every request (the slide in get_session, the turn in update_session).
        return Session(
            id=session.id,
            chat_id=session.chat_id,
            parent_id=session.parent_id if isinstance(parent_id, _Same) else parent_id,
            first_user_message=session.first_user_message,
            message_count=session.message_count if message_count is None else message_count,
            created_at=session.created_at,
            last_accessed=now,
            expires_at=now + self._timeout_ms,
            is_new=False,
        )

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
        now = self._clock()
        new = Session(
            id=session_id,
            chat_id=chat_id,
            parent_id=None,
            first_user_message=first_user_message or "",
            message_count=0,
            created_at=now,
            last_accessed=now,
            expires_at=now + self._timeout_ms,
            is_new=True,
        )
        if not self._cached:
            stored = await self.backend.insert_session(new)
            if stored.is_new:
                self.total_created += 1
            return stored
        existing = await self._load(session_id)
        if existing is not None:
            if not existing.is_expired(self._clock()):
                return replace(existing, is_new=False)
            self.total_cleaned += 1  # an expired row, replaced by the new session
        self._remember(new)
        self.writer.put_session(new)
        self.total_created += 1
        await self._commit()
        return new

    async def resolve_session(
        self, session_id: str, first_user_message: str | None = None
    ) -> Session:
        """The live session (expiry slid), or a new one (`is_new`): what each call needs.

        `get_session` then `create_session` in one step: a cache miss reads the database
        once, not twice, and no await separates the read from the create.
        """
        _check_id(session_id)
        if not self._cached:
            live = await self.get_session(session_id)
            if live is not None:
                return live
            return await self.create_session(session_id, first_user_message=first_user_message)
        session = await self._load(session_id)
        now = self._clock()
        if session is not None and not session.is_expired(now):
            slid = self._fresh(session, now)
            self._remember(slid)
            self.writer.put_session(slid)
            await self._commit()
            return slid
        if session is not None:
            self.total_cleaned += 1  # an expired row, replaced by the new session
        new = Session(
            id=session_id,
            chat_id=None,
            parent_id=None,
            first_user_message=first_user_message or "",
            message_count=0,
            created_at=now,
            last_accessed=now,
            expires_at=now + self._timeout_ms,
            is_new=True,
        )
        self._remember(new)
        self.writer.put_session(new)
        self.total_created += 1
        await self._commit()
        return new

    async def get_session(self, session_id: str) -> Session | None:
        """The live session, its expiry slid; None (and the row deleted) if expired."""
        _check_id(session_id)
        if not self._cached:
            now = self._clock()
            touched = await self.backend.touch_session(
                session_id, now=now, expires_at=now + self._timeout_ms
            )
            if touched is None:
                # Missing or expired; an expired row goes now (lazy deletion), but only if
                # it is still expired: another instance may have just revived it.
                if await self.backend.delete_session_if_expired(session_id, now):
                    self.total_cleaned += 1
                return None
            return touched
        session = await self._load(session_id)
        if session is None:
            return None
        now = self._clock()
        if session.is_expired(now):
            self._forget(session_id)
            self.total_cleaned += 1
            await self._commit()
            return None
        slid = self._fresh(session, now)
        self._remember(slid)
        self.writer.put_session(slid)
        await self._commit()
        return slid

    async def update_session(self, session_id: str, parent_id: str | None) -> bool:
        """Set the parent of the next turn and count the turn; False if missing/expired."""
        _check_id(session_id)
        now = self._clock()
        if not self._cached:
            advanced = await self.backend.advance_session(
                session_id, parent_id, now=now, expires_at=now + self._timeout_ms
            )
            if advanced is None:
                return False
            _note_turn(session_id, parent_id)
            return True
        session = await self._load(session_id)
        # No await between this read and the write below: the increment cannot be lost.
        now = self._clock()
        if session is None or session.is_expired(now):
            return False
        updated = self._fresh(
            session, now, parent_id=parent_id, message_count=session.message_count + 1
        )
        self._remember(updated)
        self.writer.put_session(updated)
        _note_turn(session_id, parent_id)
        await self._commit()
        return True

    async def update_parent_id(self, session_id: str, parent_id: str | None) -> bool:
        """The same as `update_session` (the origin API had both names)."""
        return await self.update_session(session_id, parent_id)

    async def set_chat_id(self, session_id: str, chat_id: str | None) -> bool:
        _check_id(session_id)
        note_chat(session_id, chat_id)
        now = self._clock()
        if not self._cached:
            return await self.backend.set_chat_id(session_id, chat_id, now=now)
        session = await self._load(session_id)
        now = self._clock()
        if session is None or session.is_expired(now):
            return False
        updated = replace(session, chat_id=chat_id, last_accessed=now, is_new=False)
        self._remember(updated)
        self.writer.put_session(updated)
        await self._commit()
        return True

    async def delete_session(self, session_id: str) -> bool:
        """Delete the session row; its request/response records stay."""
        _check_id(session_id)
        if not self._cached:
            return await self.backend.delete_session(session_id)
        existed = await self._load(session_id) is not None
        if existed:
            self._forget(session_id)
            await self._commit()
        return existed

    async def is_new_session(self, session_id: str) -> bool:
        return await self.get_session(session_id) is None

    async def get_parent_id(self, session_id: str) -> str | None:
        session = await self.get_session(session_id)
        return session.parent_id if session else None

    async def cleanup(self) -> int:
        """Delete expired sessions in bounded batches; return how many went."""
        await self._settle_writes()
        now = self._clock()
        deleted = 0
        batch = self.config.sweep_batch_size
        while True:
            ids = await self.backend.delete_expired_sessions(now, batch)
            for session_id in ids:
                cached = self._cache.get(session_id)
                if cached is not None and not cached.is_expired(now):
                    # Slid in memory after the flush: the row must come back.
                    self.writer.put_session(cached)
                else:
                    self._cache.pop(session_id, None)
            deleted += len(ids)
            if len(ids) < batch:
                break
            # Yield between batches so a large sweep never stalls the proxy.
            await asyncio.sleep(0)
        self.total_cleaned += deleted
        return deleted

    async def purge_records(self, retention: float | None = None) -> int:
        """Delete request/response records older than `retention` seconds (default: config)."""
        retention = self.config.log_retention if retention is None else retention
        if retention is None:
            return 0
        await self._settle_writes()
        cutoff = self._clock() - round(retention * 1000)
        purged = 0
        batch = self.config.sweep_batch_size
        while True:
            n = await self.backend.delete_records_before(cutoff, batch)
            purged += n
            if n < batch:
                break
            await asyncio.sleep(0)
        self.records_purged += purged
        return purged

    async def sweep(self) -> tuple[int, int]:
        """One sweep: expired sessions, then records past retention. (sessions, records)."""
        return await self.cleanup(), await self.purge_records()

    def start_cleanup(self) -> None:
        """Sweep every `sweep_interval` seconds on the running loop (idempotent)."""
        if self._cleanup_task is None or self._cleanup_task.done():
            self._cleanup_task = asyncio.get_running_loop().create_task(
                self._cleanup_loop(), name="aiohttp_session_store.sweeper"
            )

    def stop_cleanup(self) -> None:
        """Stop the periodic sweep (idempotent)."""
        if self._cleanup_task is not None:
            self._cleanup_task.cancel()

    @property
    def cleanup_running(self) -> bool:
        return self._cleanup_task is not None and not self._cleanup_task.done()

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A failed sweep must not end the timer: the next one retries.
                self.sweep_errors += 1
                log.exception("session sweep failed; retrying in %ss", self.config.sweep_interval)

    async def shutdown(self) -> None:
        """Stop the timer, commit pending writes and close the backend; rows stay."""
        self.stop_cleanup()
        if self._cleanup_task is not None:
            # wait(), not `await task`: the task's own cancellation is expected, while a
            # cancellation of shutdown() itself must still propagate.
            await asyncio.wait({self._cleanup_task})
            self._cleanup_task = None
        await self.writer.close()
        if self._opened:
            self._opened = False
            await self.backend.close()
        self._cache.clear()

    async def get_metrics(self) -> dict[str, int]:
        # Metrics are how a failing disk is noticed: a short, bounded wait for the queue.
        if self._cached and self.writer.running:
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
        await self._settle_writes()
        query = SessionQuery(state="active", now=self._clock(), order="created_at_desc")
        return [s.id for s in await self.backend.list_sessions(query)]

    async def get_session_count(self) -> int:
        await self._settle_writes()
        return await self.backend.count_sessions(active_at=self._clock())

    async def get_all_sessions(self) -> list[tuple[str, Session]]:
        """Every session row (expired ones not yet swept included), newest first."""
        await self._settle_writes()
        sessions = await self.backend.list_sessions(SessionQuery(order="created_at_desc"))
        return [(s.id, s) for s in sessions]

    async def clear_all(self) -> int:
        """Delete every session (never records); return how many."""
        await self._settle_writes()
        self._cache.clear()
        return await self.backend.clear_sessions()

    async def _settle_writes(self) -> None:
        """Listings and sweeps read the database: commit what memory holds first.

        Bounded like a sync commit: with storage failing, a listing answers from what is
        committed instead of hanging (a sweep re-queues what memory slid meanwhile).
        """
        if self._cached and self.writer.running:
            await self.commit_bounded()
