"""How SessionManager stores sessions: one strategy per store, chosen once at construction.

`WriteBehindStrategy` (an embedded store that one process owns: SQLite) serves sessions
from a byte-bounded in-memory cache and writes them behind through the record writer, so
resolving and advancing a session costs microseconds and never awaits a write in batched
durability. A session's reads still see its own writes at once: the cache, then the
writer's queue, are consulted before the database.

`DirectStrategy` (a store shared by several proxy instances: PostgreSQL, in sync
durability) sends every call to the database, whose atomic statements keep instances
consistent (`message_count + 1` in SQL, `INSERT ... ON CONFLICT` creation). In batched
durability a shared store uses its subclass in `shared_behind` (turns written behind).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Final

from .backends.base import Backend
from .models import Session, new_session
from .session_cache import SessionCache
from .writer import DELETED, RecordWriter

__all__ = ("Counters", "DirectStrategy", "SessionStrategy", "WriteBehindStrategy")

Clock = Callable[[], int]


@dataclass
class Counters:
    """What the manager reports in `get_metrics()`, monotonic since it started."""

    total_created: int = 0
    total_cleaned: int = 0


class SessionStrategy(ABC):
    """The storage side of the session methods; ids are already checked by the manager."""

    def __init__(self, backend: Backend, clock: Clock, timeout_ms: int, counters: Counters):
        self.backend = backend
        self.clock = clock
        self.timeout_ms = timeout_ms
        self.counters = counters

    def new_session(
        self, session_id: str, now: int, chat_id: str | None, first_user_message: str
    ) -> Session:
        return Session(
            id=session_id,
            chat_id=chat_id,
            parent_id=None,
            first_user_message=first_user_message,
            message_count=0,
            created_at=now,
            last_accessed=now,
            expires_at=now + self.timeout_ms,
            is_new=True,
        )

    @abstractmethod
    async def create(self, session_id: str, chat_id: str | None, first: str) -> Session: ...

    @abstractmethod
    async def resolve(self, session_id: str, first: str) -> Session: ...

    @abstractmethod
    async def get(self, session_id: str) -> Session | None: ...

    @abstractmethod
    async def advance(self, session_id: str, parent_id: str | None) -> bool: ...

    @abstractmethod
    async def set_chat_id(self, session_id: str, chat_id: str | None) -> bool: ...

    @abstractmethod
    async def delete(self, session_id: str) -> bool: ...

    async def after_advance(self) -> None:
        """After `advance()` returned True and the manager noted the turn."""
        return None  # nothing held in memory: the database is the state

    async def settle(self) -> None:
        """Before reading listings from the database: commit what memory holds."""
        return None  # nothing held in memory: the database is the state

    def swept(self, session_ids: list[str], now: int) -> None:
        """A sweep deleted these rows (memory may hold a newer, live state of some)."""
        return None  # nothing held in memory: the database is the state

    def forget_all(self) -> None:
        """Every session row is being deleted or the store is closing."""
        return None  # nothing held in memory: the database is the state


class DirectStrategy(SessionStrategy):
    """Every call is one atomic statement on the shared database."""

    async def create(self, session_id: str, chat_id: str | None, first: str) -> Session:
        new = self.new_session(session_id, self.clock(), chat_id, first)
        stored = await self.backend.insert_session(new)
        if stored.is_new:
            self.counters.total_created += 1
        return stored

    async def resolve(self, session_id: str, first: str) -> Session:
        # One awaited statement where the backend can (PostgreSQL): slide or create.
        fresh = self.new_session(session_id, self.clock(), None, first)
        stored, replaced = await self.backend.resolve_session(fresh)
        if replaced:
            self.counters.total_cleaned += 1
        if stored.is_new:
            self.counters.total_created += 1
        return stored

    async def get(self, session_id: str) -> Session | None:
        now = self.clock()
        touched = await self.backend.touch_session(
            session_id, now=now, expires_at=now + self.timeout_ms
        )
        if touched is None:
            # Missing or expired; an expired row goes now (lazy deletion), but only if it
            # is still expired: another instance may have just revived it.
            if await self.backend.delete_session_if_expired(session_id, now):
                self.counters.total_cleaned += 1
            return None
        return touched

    async def advance(self, session_id: str, parent_id: str | None) -> bool:
        now = self.clock()
        advanced = await self.backend.advance_session(
            session_id, parent_id, now=now, expires_at=now + self.timeout_ms
        )
        return advanced is not None

    async def set_chat_id(self, session_id: str, chat_id: str | None) -> bool:
        return await self.backend.set_chat_id(session_id, chat_id, now=self.clock())

    async def delete(self, session_id: str) -> bool:
        return await self.backend.delete_session(session_id)


class _Same:
    """`_fresh`'s default for a field the caller leaves as it was (None is a value)."""

    __slots__ = ()


_SAME: Final = _Same()


class WriteBehindStrategy(SessionStrategy):
    """Sessions served from memory and committed behind by the writer."""

    def __init__(
        self,
        backend: Backend,
        clock: Clock,
        timeout_ms: int,
        counters: Counters,
        *,
        writer: RecordWriter,
        cache: SessionCache,
        commit: Callable[[], Awaitable[object]],
        sync: bool,
    ) -> None:
        super().__init__(backend, clock, timeout_ms, counters)
        self.writer = writer
        self.cache = cache
        self._commit_bounded = commit
        self._sync = sync

    async def _commit(self) -> None:
        if self._sync:
            await self._commit_bounded()

    def _remember(self, session: Session) -> None:
        self.cache.put(session)
        self.writer.put_session(session)

    def _known(self, session_id: str) -> tuple[bool, Session | None]:
        """(True, state) when memory knows the newest state (None: deleted), else (False, None)."""
        cached = self.cache.get(session_id)
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
            self.cache.put(stored)
        return stored

    def _forget(self, session_id: str) -> None:
        self.cache.pop(session_id)
        self.writer.delete_session(session_id)

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
        return new_session(
            id=session.id,
            chat_id=session.chat_id,
            parent_id=session.parent_id if isinstance(parent_id, _Same) else parent_id,
            first_user_message=session.first_user_message,
            message_count=session.message_count if message_count is None else message_count,
            created_at=session.created_at,
            last_accessed=now,
            expires_at=now + self.timeout_ms,
            is_new=False,
        )

    async def _create_new(self, session_id: str, chat_id: str | None, first: str) -> Session:
        new = self.new_session(session_id, self.clock(), chat_id, first)
        self._remember(new)
        self.counters.total_created += 1
        await self._commit()
        return new

    async def create(self, session_id: str, chat_id: str | None, first: str) -> Session:
        existing = await self._load(session_id)
        if existing is not None:
            if not existing.is_expired(self.clock()):
                return replace(existing, is_new=False)
            self.counters.total_cleaned += 1  # an expired row, replaced by the new session
        return await self._create_new(session_id, chat_id, first)

    async def resolve(self, session_id: str, first: str) -> Session:
        # A cache miss reads the database once, and no await separates the read from
        # the create: concurrent resolves of one new id create one session.
        known, session = self._known(session_id)
        if not known:  # awaited only on a miss: a coroutine less per call otherwise
            session = await self._load(session_id)
        now = self.clock()
        if session is not None and not session.is_expired(now):
            slid = self._fresh(session, now)
            self._remember(slid)
            if self._sync:
                await self._commit_bounded()
            return slid
        if session is not None:
            self.counters.total_cleaned += 1  # an expired row, replaced by the new session
        return await self._create_new(session_id, None, first)

    async def get(self, session_id: str) -> Session | None:
        session = await self._load(session_id)
        if session is None:
            return None
        now = self.clock()
        if session.is_expired(now):
            self._forget(session_id)
            self.counters.total_cleaned += 1
            await self._commit()
            return None
        slid = self._fresh(session, now)
        self._remember(slid)
        await self._commit()
        return slid

    async def advance(self, session_id: str, parent_id: str | None) -> bool:
        known, session = self._known(session_id)
        if not known:
            session = await self._load(session_id)
        # No await between this read and the write below: the increment cannot be lost.
        now = self.clock()
        if session is None or session.is_expired(now):
            return False
        self._remember(
            self._fresh(session, now, parent_id=parent_id, message_count=session.message_count + 1)
        )
        return True

    async def after_advance(self) -> None:
        if self._sync:
            await self._commit_bounded()

    async def set_chat_id(self, session_id: str, chat_id: str | None) -> bool:
        session = await self._load(session_id)
        now = self.clock()
        if session is None or session.is_expired(now):
            return False
        self._remember(replace(session, chat_id=chat_id, last_accessed=now, is_new=False))
        await self._commit()
        return True

    async def delete(self, session_id: str) -> bool:
        existed = await self._load(session_id) is not None
        if existed:
            self._forget(session_id)
            await self._commit()
        return existed

    async def settle(self) -> None:
        # Bounded like a sync commit: with storage failing, a listing answers from what
        # is committed instead of hanging (a sweep re-queues what memory slid meanwhile).
        if self.writer.running:
            await self._commit_bounded()

    def swept(self, session_ids: list[str], now: int) -> None:
        for session_id in session_ids:
            cached = self.cache.get(session_id)
            if cached is not None and not cached.is_expired(now):
                # Slid in memory after the flush: the row must come back.
                self.writer.put_session(cached)
            else:
                self.cache.pop(session_id)

    def forget_all(self) -> None:
        self.cache.clear()
