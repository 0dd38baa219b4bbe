"""The package's value types: sessions and the records written for each call."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any, Final, Literal, TypeVar

__all__ = (
    "OUTCOMES",
    "Exchange",
    "LineageNode",
    "Outcome",
    "RequestQuery",
    "RequestRecord",
    "ResponseFact",
    "ResponseRecord",
    "Session",
    "SessionChange",
    "SessionOrder",
    "SessionQuery",
    "WriteBatch",
    "new_lineage_node",
    "new_request_record",
    "new_response_record",
    "new_session",
    "now_ms",
    "storable",
)

Outcome = Literal["completed", "client_disconnected", "upstream_error", "handler_error"]
OUTCOMES: Final[tuple[Outcome, ...]] = (
    "completed",
    "client_disconnected",
    "upstream_error",
    "handler_error",
)


def now_ms() -> int:
    """Wall-clock time as integer milliseconds since the epoch (the unit of every column)."""
    return time.time_ns() // 1_000_000


def storable(value: object) -> object:
    """A value a database driver can encode: lone surrogates in a str become U+FFFD.

    They reach us from JSON escapes ("\\ud800") and from undecodable header bytes, and no
    database accepts them as UTF-8 text.
    """
    if type(value) is not str or value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return value


@dataclass(frozen=True, slots=True)
class LineageNode:
    """A point of a conversation the upstream has seen: the reply a call's handler stored.

    `hash` is the chain hash of the call's messages followed by its reply (see `lineage`),
    so the same history resent by a client finds this node again. Nodes are immutable and
    content-addressed: inserting one whose hash exists keeps the first (no duplicate).
    """

    hash: str
    scope: str
    session_id: str | None
    chat_id: str | None
    node_id: str
    response_id: str | None
    #: Messages in the chain up to and including the reply.
    depth: int
    #: The node this call continued from (None: it started a new upstream chat).
    parent_hash: str | None
    created_at: int


@dataclass(frozen=True, slots=True)
class Session:
    """A conversation: which upstream chat it maps to and the parent of its next turn."""

    id: str
    chat_id: str | None
    parent_id: str | None
    first_user_message: str
    message_count: int
    created_at: int
    last_accessed: int
    expires_at: int
    #: True only on the value returned by the call that created the row.
    is_new: bool = field(default=False, compare=False)

    def is_expired(self, now: int) -> bool:
        return self.expires_at <= now


@dataclass(frozen=True, slots=True)
class SessionChange:
    """Turns and ids one instance of a shared store set on a session, committed behind.

    The writer applies it with atomic SQL (`message_count + turns`, the latest of the times,
    the ids only when set here), so instances advancing one session never lose a turn.
    `session` is the row as this instance expects it afterwards: its own reads are served
    from it until the commit.
    """

    session: Session
    turns: int
    set_parent: bool
    set_chat: bool
    #: `last_accessed` and `expires_at` never move back: each takes the later value (0: kept).
    accessed: int
    expires_at: int

    def then(self, later: SessionChange) -> SessionChange:
        """This change followed by `later` (of the same session), as one."""
        return SessionChange(
            session=later.session,
            turns=self.turns + later.turns,
            set_parent=self.set_parent or later.set_parent,
            set_chat=self.set_chat or later.set_chat,
            accessed=max(self.accessed, later.accessed),
            expires_at=max(self.expires_at, later.expires_at),
        )


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One call as the client sent it (a row of `requests`)."""

    request_id: str
    session_id: str | None
    timestamp: int
    method: str
    path: str
    model: str | None
    stream: bool
    openai_request: str | None
    upstream_request: str | None
    headers: str | None
    created_at: int


@dataclass(frozen=True, slots=True)
class ResponseRecord:
    """How one call ended (a row of `responses`)."""

    response_id: str
    request_id: str
    session_id: str | None
    timestamp: int
    status_code: int | None
    outcome: Outcome
    openai_response: str | None
    upstream_response: str | None
    parent_id: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    finish_reason: str | None
    error: str | None
    duration_ms: int
    first_byte_ms: int | None
    created_at: int


@dataclass(frozen=True, slots=True)
class Exchange:
    """A request with its response (None while the call is in flight or was lost)."""

    request: RequestRecord
    response: ResponseRecord | None


@dataclass(frozen=True, slots=True)
class ResponseFact:
    """The measurable part of a response, joined with its request's model, for statistics."""

    session_id: str | None
    model: str | None
    outcome: str
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    duration_ms: int
    first_byte_ms: int | None


SessionOrder = Literal[
    "created_at_desc",
    "created_at_asc",
    "last_accessed_desc",
    "last_accessed_asc",
    "expires_at_desc",
    "expires_at_asc",
    "message_count_desc",
]
SESSION_ORDERS: Final[tuple[SessionOrder, ...]] = (
    "created_at_desc",
    "created_at_asc",
    "last_accessed_desc",
    "last_accessed_asc",
    "expires_at_desc",
    "expires_at_asc",
    "message_count_desc",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionQuery:
    """Which sessions to list. `state` compares `expires_at` with `now`."""

    state: Literal["all", "active", "expired"] = "all"
    now: int = 0
    limit: int | None = None
    offset: int = 0
    order: SessionOrder = "created_at_desc"


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestQuery:
    """Filters over `requests`, all optional and combined with AND; newest first by default."""

    session_id: str | None = None
    model: str | None = None
    stream: bool | None = None
    since: int | None = None
    until: int | None = None
    limit: int | None = None
    offset: int = 0
    oldest_first: bool = False


@dataclass(slots=True)
class WriteBatch:
    """Everything the writer commits in one transaction.

    `sessions` are full snapshots (last state wins), `deleted_sessions` ids to remove; an id
    is never in both. Requests are inserted before the upstream updates and the responses
    that refer to them.
    """

    sessions: list[Session] = field(default_factory=list)
    deleted_sessions: list[str] = field(default_factory=list)
    requests: list[RequestRecord] = field(default_factory=list)
    upstream_requests: list[tuple[str, str]] = field(default_factory=list)
    responses: list[ResponseRecord] = field(default_factory=list)
    nodes: list[LineageNode] = field(default_factory=list)
    #: A shared store's session changes (at most one per id), applied after everything else.
    changes: list[SessionChange] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.nodes)
            + len(self.changes)
            + len(self.sessions)
            + len(self.deleted_sessions)
            + len(self.requests)
            + len(self.upstream_requests)
            + len(self.responses)
        )

    def singles(self) -> list[WriteBatch]:
        """One batch per item, in commit order (to salvage a batch one bad item refused)."""
        return [
            *(WriteBatch(sessions=[s]) for s in self.sessions),
            *(WriteBatch(deleted_sessions=[d]) for d in self.deleted_sessions),
            *(WriteBatch(requests=[r]) for r in self.requests),
            *(WriteBatch(upstream_requests=[u]) for u in self.upstream_requests),
            *(WriteBatch(responses=[r]) for r in self.responses),
            *(WriteBatch(nodes=[n]) for n in self.nodes),
            *(WriteBatch(changes=[c]) for c in self.changes),
        ]


_T = TypeVar("_T")


def _quick(cls: type[_T]) -> Callable[..., _T]:
    """A constructor of the frozen slotted dataclass `cls` at a quarter of its cost.

    A frozen dataclass's __init__ sets each field through object.__setattr__, about 1,200
    instructions a field on CPython 3.11: 10-20k per record, several records per call. This
    builds the object as a non-frozen twin with the same slots (plain slot stores), then
    gives it its class: the result is an ordinary, frozen, hashable `cls` instance. Where
    the interpreter refuses the class change, `cls` itself.
    """
    specs = [
        (f.name, f.type, field(default=f.default) if f.default is not MISSING else field())
        for f in fields(cls)  # type: ignore[arg-type]
    ]
    twin: Any = make_dataclass(f"_{cls.__name__}Twin", specs, slots=True)

    def build(*args: Any, **kwargs: Any) -> _T:
        obj = twin(*args, **kwargs)
        obj.__class__ = cls
        return obj  # type: ignore[no-any-return]

    try:
        values = [1] * len(specs)
        if build(*values) != cls(*values):
            return cls
    except TypeError:  # pragma: no cover - an interpreter without compatible layouts
        return cls
    return build


#: Fast constructors (same arguments as the class) for the objects made on every call.
new_session: Final = _quick(Session)
new_request_record: Final = _quick(RequestRecord)
new_response_record: Final = _quick(ResponseRecord)
new_lineage_node: Final = _quick(LineageNode)
