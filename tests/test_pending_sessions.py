"""pending_sessions.py: session state held for the writer, pending then in flight, in bytes."""

from __future__ import annotations

from aiohttp_session_store.models import Session, SessionChange
from aiohttp_session_store.pending_sessions import DELETED, PendingSessions
from aiohttp_session_store.session_cache import session_bytes


def session(sid: str, parent: str | None = None, first: str = "hi") -> Session:
    return Session(sid, "chat", parent, first, 0, 1, 1, 100)


def change(sid: str, parent: str, turns: int = 1) -> SessionChange:
    return SessionChange(session(sid, parent), turns, True, False, 2, 200)


def test_the_newest_snapshot_wins_and_bytes_follow_it() -> None:
    p = PendingSessions(max_entries=10)
    assert p.put_snapshot(session("a", first="x" * 100))
    assert p.put_snapshot(session("a", "p1"))
    assert p.lookup("a") == session("a", "p1")
    assert p.bytes == session_bytes(session("a", "p1"))
    p.delete("a")
    assert p.lookup("a") is DELETED
    assert p.bytes == 0


def test_a_new_id_past_the_entry_bound_is_refused_an_old_one_replaced() -> None:
    p = PendingSessions(max_entries=1)
    assert p.put_snapshot(session("a"))
    assert not p.put_snapshot(session("b"))
    assert p.put_snapshot(session("a", "p2"))
    assert p.put_change(change("c", "x"), room=1 << 20)
    assert not p.put_change(change("d", "x"), room=1 << 20)


def test_changes_merge_per_id_and_a_new_id_needs_room_in_bytes() -> None:
    p = PendingSessions(max_entries=10)
    assert not p.put_change(change("a", "p1"), room=10)
    assert p.put_change(change("a", "p1"), room=1 << 20)
    assert p.put_change(change("a", "p2", turns=2), room=0)  # merging needs no new room
    merged = p.change_of("a")
    assert merged is not None
    assert (merged.session.parent_id, merged.turns) == ("p2", 3)
    assert p.pending_turns("a") == 3


def test_taken_state_stays_visible_in_flight_until_settled() -> None:
    p = PendingSessions(max_entries=10)
    p.put_snapshot(session("a", "p1"))
    p.delete("b")
    p.put_change(change("c", "x"), room=1 << 20)
    held = p.bytes
    sessions, deleted, changes = p.take()
    assert ([s.id for s in sessions], deleted, [c.session.id for c in changes]) == (
        ["a"],
        ["b"],
        ["c"],
    )
    # In flight: still seen by reads and counted, but no longer pending turns.
    assert p.lookup("a") == session("a", "p1")
    assert p.lookup("b") is DELETED
    assert p.change_of("c") is not None
    assert p.pending_turns("c") == 0
    assert p.bytes == held
    # Newer pending state wins over what is in flight.
    p.put_snapshot(session("a", "p9"))
    assert p.lookup("a") == session("a", "p9")
    p.settled()
    assert p.change_of("c") is None
    assert p.lookup("b") is None
    assert p.bytes == session_bytes(session("a", "p9"))


def test_a_change_about_a_replaced_row_is_not_merged_into_the_new_one() -> None:
    p = PendingSessions(max_entries=10)
    assert p.put_change(change("a", "old", turns=2), room=1 << 20)
    replaced = Session("a", "chat", "new", "hi", 0, 50, 50, 300)  # created again at 50
    assert p.put_change(SessionChange(replaced, 1, True, False, 50, 300), room=0)
    held = p.change_of("a")
    assert held is not None
    assert (held.session.created_at, held.turns, held.session.parent_id) == (50, 1, "new")
    assert p.bytes == session_bytes(replaced)
    assert p.changes_held == 1
