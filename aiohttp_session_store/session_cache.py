"""A least-recently-used map of sessions bounded by entry count and by bytes held."""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from .models import Session

__all__ = ("CUT_MARK", "SessionCache", "cut_text", "session_bytes", "str_bytes")

#: Appended to a first user message cut to `max_first_message_bytes`.
CUT_MARK: Final = "…[cut]"
_CUT_MARK_BYTES: Final = len(CUT_MARK.encode())

# A Session object with its slots and small ints, measured on CPython 3.12 (rounded up):
# what an entry costs beyond the strings it holds.
_SESSION_OVERHEAD: Final = 200
# A str object's header as CPython 3.10-3.13 lay it out: ASCII (at most 49 bytes), else
# at most 76 bytes and 4 per character.
_ASCII_HEAD: Final = 49
_WIDE_HEAD: Final = 76


def str_bytes(text: str) -> int:
    """Memory a str holds: sys.getsizeof's figure or a little more, at a third of its cost.

    Run several times per call (every cached and queued value is sized), where
    sys.getsizeof's special-method lookup cost more than the rest of the sizing.
    """
    n = len(text)
    return _ASCII_HEAD + n if text.isascii() else _WIDE_HEAD + 4 * n


def cut_text(text: str, limit: int) -> str:
    """`text` if its UTF-8 form fits `limit` bytes, else a prefix ending in CUT_MARK that does.

    The prefix is cut on a character boundary, so the result is valid text of at most
    `limit` bytes (a limit shorter than the mark gives the mark alone, cut likewise).
    """
    if len(text) * 4 <= limit:  # no character takes more than 4 bytes
        return text
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return text
    keep = max(limit - _CUT_MARK_BYTES, 0)
    prefix = encoded[:keep].decode("utf-8", "ignore")  # drops a split last character
    return (prefix + CUT_MARK) if keep else CUT_MARK.encode()[:limit].decode("utf-8", "ignore")


def session_bytes(session: Session) -> int:
    """Memory a session holds: its strings as CPython stores them, plus the object."""
    size = _SESSION_OVERHEAD + str_bytes(session.id) + str_bytes(session.first_user_message)
    chat_id, parent_id = session.chat_id, session.parent_id
    if chat_id is not None:
        size += str_bytes(chat_id)
    if parent_id is not None:
        size += str_bytes(parent_id)
    return size


class SessionCache:
    """Sessions by id, oldest use evicted first once past `max_entries` or `max_bytes`.

    Forgetting is always safe: an uncommitted snapshot is still in the writer's queue and
    a committed one is in the database.
    """

    __slots__ = ("_entries", "bytes", "max_bytes", "max_entries")

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self._entries: OrderedDict[str, tuple[Session, int]] = OrderedDict()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, session_id: str) -> Session | None:
        entry = self._entries.get(session_id)
        return None if entry is None else entry[0]

    def put(self, session: Session) -> None:
        entries = self._entries
        size = session_bytes(session)
        old = entries.pop(session.id, None)
        if old is not None:
            self.bytes -= old[1]
        entries[session.id] = (session, size)
        self.bytes += size
        while entries and (len(entries) > self.max_entries or self.bytes > self.max_bytes):
            _, (_, dropped) = entries.popitem(last=False)
            self.bytes -= dropped

    def pop(self, session_id: str) -> None:
        old = self._entries.pop(session_id, None)
        if old is not None:
            self.bytes -= old[1]

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0
