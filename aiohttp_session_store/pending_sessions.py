"""Session state handed to the record writer and not yet known to be committed.

A store one process owns hands over full snapshots (the newest of an id wins) and
deletions; a shared store hands over `SessionChange`s, merged per id and applied by atomic
SQL. Each is held pending until the writer takes a batch, then in flight until its commit
settles, so reads keep seeing it the whole time. Sizes are kept in bytes: they count
against the writer's `max_pending_bytes`.
"""

from __future__ import annotations

from typing import Final

from .models import Session, SessionChange
from .session_cache import session_bytes

__all__ = ("DELETED", "PendingSessions")


class _Deleted:
    """Marker: the session was deleted and the deletion is not yet committed."""

    def __repr__(self) -> str:
        return "DELETED"


DELETED: Final = _Deleted()


class PendingSessions:
    """Snapshots, deletions and changes of sessions, pending and in flight."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._snapshots: dict[str, Session | _Deleted] = {}
        self._changes: dict[str, SessionChange] = {}
        self._bytes = 0
        self._inflight_snapshots: dict[str, Session | _Deleted] = {}
        self._inflight_changes: dict[str, SessionChange] = {}
        self._inflight_bytes = 0

    @property
    def bytes(self) -> int:
        """Bytes held, pending and in flight."""
        return self._bytes + self._inflight_bytes

    def put_snapshot(self, session: Session) -> bool:
        """Hold `session` (replacing the id's pending one); False when full for a new id."""
        old = self._snapshots.get(session.id)
        if old is None and len(self._snapshots) >= self._max_entries:
            return False
        if isinstance(old, Session):
            self._bytes -= session_bytes(old)
        self._snapshots[session.id] = session
        self._bytes += session_bytes(session)
        return True

    def delete(self, session_id: str) -> None:
        old = self._snapshots.get(session_id)
        if isinstance(old, Session):
            self._bytes -= session_bytes(old)
        self._snapshots[session_id] = DELETED

    def put_change(self, change: SessionChange, room: int) -> bool:
        """Merge `change` into the id's pending one; False when a new id finds no room
        (`len` entries, or `room` bytes left under the writer's bound)."""
        session_id = change.session.id
        old = self._changes.get(session_id)
        size = session_bytes(change.session)
        if old is None or old.session.created_at != change.session.created_at:
            # New, or about a row since replaced (expired, created again): its turns
            # belong to no row that exists, so they are not added to the new one's.
            if old is None and (len(self._changes) >= self._max_entries or size > room):
                return False
        else:
            change = old.then(change)
        if old is not None:
            self._bytes -= session_bytes(old.session)
        self._changes[session_id] = change
        self._bytes += size
        return True

    @property
    def changes_held(self) -> int:
        """Session changes not yet known to be committed (pending and in flight)."""
        return len(self._changes) + len(self._inflight_changes)

    def lookup(self, session_id: str) -> Session | _Deleted | None:
        """The newest uncommitted snapshot of a session, DELETED, or None."""
        found = self._snapshots.get(session_id)
        return found if found is not None else self._inflight_snapshots.get(session_id)

    def change_of(self, session_id: str) -> SessionChange | None:
        """The newest change of a session not known to be committed (pending or in flight)."""
        found = self._changes.get(session_id)
        return found if found is not None else self._inflight_changes.get(session_id)

    def pending_turns(self, session_id: str) -> int:
        """Turns of a session not yet taken for a commit: no row read has them."""
        found = self._changes.get(session_id)
        return 0 if found is None else found.turns

    def take(self) -> tuple[list[Session], list[str], list[SessionChange]]:
        """Everything pending, now in flight: snapshots, deleted ids, changes."""
        snapshots, changes = self._snapshots, self._changes
        self._inflight_snapshots, self._inflight_changes = snapshots, changes
        self._inflight_bytes, self._bytes = self._bytes, 0
        self._snapshots, self._changes = {}, {}
        return (
            [s for s in snapshots.values() if isinstance(s, Session)],
            [k for k, s in snapshots.items() if s is DELETED],
            list(changes.values()),
        )

    def settled(self) -> None:
        """The batch in flight is committed (or given up): forget it."""
        self._inflight_snapshots, self._inflight_changes = {}, {}
        self._inflight_bytes = 0
