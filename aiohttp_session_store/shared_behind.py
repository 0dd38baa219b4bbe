"""A shared store's sessions in batched durability: one awaited statement per call.

Each call resolves its session with one awaited statement (slide or create, committed
without waiting for the WAL flush); the turn its handler reports (`update_parent_id`,
`set_chat_id`) goes to the record writer as a `SessionChange`, committed with the next
batch by atomic SQL (`message_count + n`, the later of the times), so instances sharing
the store never lose a turn.

This instance's own reads see its changes at once: a read applies the change the writer
still holds for the session (pending or in flight) to the row it got. Another instance
sees them once they are committed: the writer commits a turn as soon as it is handed
over (`prompt_turns`), so the window is a commit or two (the README states it).
`durability="sync"` keeps `DirectStrategy` (every change awaited) instead.

To advance without a query, the instance needs the session it knows to be live (and
which row that is: its `created_at`). It keeps the sessions it resolved last, bounded by
count and bytes; one it does not know, or knows as expired, is advanced by the awaited
statement, as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .backends.base import Backend
from .models import Session, SessionChange
from .session_cache import SessionCache
from .strategies import Clock, Counters, DirectStrategy
from .writer import RecordWriter

__all__ = ("SharedBehindStrategy",)


class SharedBehindStrategy(DirectStrategy):
    """Resolves by one statement; turns and chat ids committed behind by the writer."""

    def __init__(
        self,
        backend: Backend,
        clock: Clock,
        timeout_ms: int,
        counters: Counters,
        *,
        writer: RecordWriter,
        known: SessionCache,
        commit: Callable[[], Awaitable[object]],
    ) -> None:
        super().__init__(backend, clock, timeout_ms, counters)
        self.writer = writer
        self.known = known
        self._commit_bounded = commit

    def _view(self, row: Session, before: SessionChange | None) -> Session:
        """`row` as this instance sees it: with its own change not yet (known) committed.

        `before` is the change held when the read was sent: if the writer committed it
        meanwhile, the row may or may not hold it, so ids come from the change (setting
        them again is what the commit did) and the count is the larger of the two.
        """
        change = self.writer.change_of(row.id) or before
        if change is None or change.session.created_at != row.created_at:
            return row  # nothing of ours, or about a row since replaced
        mine = change.session
        return Session(
            id=row.id,
            chat_id=mine.chat_id,
            parent_id=mine.parent_id,
            first_user_message=row.first_user_message,
            message_count=max(
                row.message_count + self.writer.pending_turns(row.id), mine.message_count
            ),
            created_at=row.created_at,
            last_accessed=max(row.last_accessed, mine.last_accessed),
            expires_at=max(row.expires_at, mine.expires_at),
            is_new=row.is_new,
        )

    def _live(self, session_id: str, now: int) -> Session | None:
        """The session as this instance last saw it, if it was live then and still is."""
        # Only what `known` holds: `_queue` keeps each change's session there, and `delete`
        # and `swept` take it out, so a change still held for a deleted session (a writer
        # busy or failing) can never make a later turn look accepted and then match no row.
        session = self.known.get(session_id)
        if session is None or session.is_expired(now) or not self.writer.running:
            return None
        return session

    def _queue(self, change: SessionChange) -> bool:
        if not self.writer.put_change(change):
            return False  # the writer is full (storage failing): write it directly
        self.known.put(change.session)
        return True

    async def create(self, session_id: str, chat_id: str | None, first: str) -> Session:
        stored = await super().create(session_id, chat_id, first)
        self.known.put(stored)
        return stored

    async def resolve(self, session_id: str, first: str) -> Session:
        before = self.writer.change_of(session_id)
        fresh = self.new_session(session_id, self.clock(), None, first)
        stored, replaced = await self.backend.resolve_session(fresh, synchronous=False)
        if replaced:
            self.counters.total_cleaned += 1
        if stored.is_new:
            self.counters.total_created += 1
        view = self._view(stored, before)
        self.known.put(view)
        return view

    async def get(self, session_id: str) -> Session | None:
        before = self.writer.change_of(session_id)
        stored = await super().get(session_id)
        if stored is None:
            self.known.pop(session_id)
            return None
        view = self._view(stored, before)
        self.known.put(view)
        return view

    async def advance(self, session_id: str, parent_id: str | None) -> bool:
        now = self.clock()
        base = self._live(session_id, now)
        if base is not None:
            expires_at = now + self.timeout_ms
            session = Session(
                id=session_id,
                chat_id=base.chat_id,
                parent_id=parent_id,
                first_user_message=base.first_user_message,
                message_count=base.message_count + 1,
                created_at=base.created_at,
                last_accessed=now,
                expires_at=expires_at,
            )
            change = SessionChange(session, 1, True, False, now, expires_at)
            if self._queue(change):
                return True
        advanced = await self.backend.advance_session(
            session_id, parent_id, now=now, expires_at=now + self.timeout_ms
        )
        if advanced is None:
            self.known.pop(session_id)
            return False
        self.known.put(advanced)
        return True

    async def set_chat_id(self, session_id: str, chat_id: str | None) -> bool:
        now = self.clock()
        base = self._live(session_id, now)
        if base is not None:
            session = Session(
                id=session_id,
                chat_id=chat_id,
                parent_id=base.parent_id,
                first_user_message=base.first_user_message,
                message_count=base.message_count,
                created_at=base.created_at,
                last_accessed=now,
                expires_at=base.expires_at,
            )
            # No slide: setting a chat id leaves the expiry as it was (expires_at 0).
            if self._queue(SessionChange(session, 0, False, True, now, 0)):
                return True
        if await super().set_chat_id(session_id, chat_id):
            return True
        self.known.pop(session_id)
        return False

    async def delete(self, session_id: str) -> bool:
        self.known.pop(session_id)
        return await super().delete(session_id)

    async def settle(self) -> None:
        # Listings read the database: commit this instance's changes first (bounded).
        if self.writer.running:
            await self._commit_bounded()

    def swept(self, session_ids: list[str], now: int) -> None:
        for session_id in session_ids:
            self.known.pop(session_id)

    def forget_all(self) -> None:
        self.known.clear()
