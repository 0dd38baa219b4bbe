"""Conversation sessions and request/response records for OpenAI-compatible proxies on aiohttp."""

from __future__ import annotations

from .assembler import AssembledStream, ChatStreamAssembler
from .completion import CompletionSummary, completion_summary
from .config import StoreConfig
from .errors import (
    BackendUnavailableError,
    DatabaseNotFoundError,
    ForeignDatabaseError,
    InvalidSessionIdError,
    SchemaVersionError,
    StoreError,
    StoreUnavailableError,
    StoreWriteError,
)
from .hashing import generate_session_id
from .manager import SessionManager
from .models import LineageNode, RequestRecord, ResponseRecord, Session
from .plugin import (
    STORE_KEY,
    SessionStore,
    get_session,
    get_store,
    get_turn,
    mark_upstream_error,
    set_upstream,
    setup,
)
from .sse import SSEEvent, SSEParser
from .turn import Turn

__version__ = "0.1.0"

__all__ = (
    "STORE_KEY",
    "AssembledStream",
    "BackendUnavailableError",
    "ChatStreamAssembler",
    "CompletionSummary",
    "DatabaseNotFoundError",
    "ForeignDatabaseError",
    "InvalidSessionIdError",
    "LineageNode",
    "RequestRecord",
    "ResponseRecord",
    "SSEEvent",
    "SSEParser",
    "SchemaVersionError",
    "Session",
    "SessionManager",
    "SessionStore",
    "StoreConfig",
    "StoreError",
    "StoreUnavailableError",
    "StoreWriteError",
    "Turn",
    "completion_summary",
    "generate_session_id",
    "get_session",
    "get_store",
    "get_turn",
    "mark_upstream_error",
    "set_upstream",
    "setup",
)
