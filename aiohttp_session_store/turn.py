"""A call's place in its conversation: what `get_turn(request)` gives a handler.

Before the handler runs, the middleware finds the longest prefix of the client's history
that ends in a reply the upstream produced (a known lineage node). The handler continues
that upstream chat from that node with only the messages after it, or, when nothing is
known, starts a new chat with the whole history. It then reports the upstream node its
reply became, with `await turn.advance(chat_id=..., node_id=...)`, and the store records
the new point of the conversation when the call completes.

Handlers written before lineage existed report the same through the session API: while a
recorded call is handled, `manager.set_chat_id(id, ...)` and `manager.update_parent_id(id,
...)` on the call's own session are noted on its turn (`CURRENT_TURN`, a context
variable scoped to the call, so concurrent calls never see each other's notes).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .models import LineageNode, Session

__all__ = ("CURRENT_TURN", "SessionUpdates", "Turn", "note_chat", "note_reply")


class SessionUpdates(Protocol):
    """What a turn needs of the session manager to advance its session."""

    async def set_chat_id(self, session_id: str, chat_id: str | None) -> bool: ...

    async def update_parent_id(self, session_id: str, parent_id: str | None) -> bool: ...


@dataclass(slots=True, eq=False)
class Turn:
    """Where one call continues its upstream conversation, and what its handler made of it."""

    #: The call's session (None: no user message and no session header).
    session: Session | None
    #: The caller's scope: "" without a credential, else the credential's digest.
    scope: str
    #: Every message the client sent, in order.
    history: list[Any]
    #: The known point the history continues (None: nothing known, start a new chat).
    node: LineageNode | None = None
    #: Chain hashes of `history` (hex), or None when a message was malformed.
    hashes: list[str] | None = None
    #: The last of `hashes` as raw bytes (what the reply's link extends), when known.
    last_digest: bytes | None = None
    #: Set by the handler: the upstream chat and node its reply became.
    reply_chat_id: str | None = None
    reply_node_id: str | None = None
    advanced: bool = False
    manager: SessionUpdates | None = None

    @property
    def chat_id(self) -> str | None:
        """The upstream chat to continue, or None to start a new one."""
        return self.node.chat_id if self.node is not None else None

    @property
    def parent_id(self) -> str | None:
        """The upstream node to attach `messages` under (None with a new chat)."""
        return self.node.node_id if self.node is not None else None

    @property
    def depth(self) -> int:
        """How many of the client's messages the upstream already holds on this branch."""
        return self.node.depth if self.node is not None else 0

    @property
    def messages(self) -> list[Any]:
        """The messages the upstream has not seen on this branch: send exactly these."""
        return self.history[self.depth :]

    def restart(self) -> None:
        """Forget the matched point (the upstream lost it): the whole history is the tail."""
        self.node = None

    async def advance(self, *, chat_id: str, node_id: str) -> None:
        """Report the upstream chat and node this call's reply became.

        Updates the session too (`chat_id`, and `parent_id` with `message_count + 1`), as
        `set_chat_id` and `update_parent_id` do.
        """
        session, manager = self.session, self.manager
        if session is not None and manager is not None:
            if session.chat_id != chat_id:
                await manager.set_chat_id(session.id, chat_id)
            await manager.update_parent_id(session.id, node_id)
        self.reply_chat_id = chat_id
        self.reply_node_id = node_id
        self.advanced = True


#: The turn of the call being handled in this context (set by the middleware per call).
CURRENT_TURN: Final[ContextVar[Turn | None]] = ContextVar(
    "aiohttp_session_store.turn", default=None
)


def _own(session_id: str) -> Turn | None:
    turn = CURRENT_TURN.get()
    if turn is None or turn.session is None or turn.session.id != session_id:
        return None
    return turn


def note_reply(session_id: str, node_id: str | None) -> None:
    """`update_parent_id` on the current call's own session: that is its reply's node."""
    turn = _own(session_id)
    if turn is not None:
        turn.reply_node_id = node_id
        turn.advanced = True


def note_chat(session_id: str, chat_id: str | None) -> None:
    """`set_chat_id` on the current call's own session: its reply lives in that chat."""
    turn = _own(session_id)
    if turn is not None:
        turn.reply_chat_id = chat_id
