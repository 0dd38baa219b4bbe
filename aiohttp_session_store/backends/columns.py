"""The column lists every backend reads and writes, in one place (the schema is shared)."""

from __future__ import annotations

from typing import Final

__all__ = (
    "LINEAGE_COLUMNS",
    "MUTABLE_RESPONSE_COLUMNS",
    "ORPHAN_GRACE_MS",
    "REQUEST_COLUMNS",
    "RESPONSE_COLUMNS",
    "SESSION_COLUMNS",
)

# Every column list is spelled out, never `*`, so a later migration that adds a column
# cannot shift the positions the row converters below read.
SESSION_COLUMNS: Final = (
    "id",
    "chat_id",
    "parent_id",
    "first_user_message",
    "message_count",
    "created_at",
    "last_accessed",
    "expires_at",
)
REQUEST_COLUMNS: Final = (
    "request_id",
    "session_id",
    "timestamp",
    "method",
    "path",
    "model",
    "stream",
    "openai_request",
    "upstream_request",
    "headers",
    "created_at",
)
RESPONSE_COLUMNS: Final = (
    "response_id",
    "request_id",
    "session_id",
    "timestamp",
    "status_code",
    "outcome",
    "openai_response",
    "upstream_response",
    "parent_id",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "finish_reason",
    "error",
    "duration_ms",
    "first_byte_ms",
    "created_at",
)

# What a response recorded again under its id may change (sync durability records a
# stream before its end is sent, then once more when the handler has returned).
MUTABLE_RESPONSE_COLUMNS: Final = tuple(
    c
    for c in RESPONSE_COLUMNS
    if c not in ("response_id", "request_id", "session_id", "timestamp", "created_at")
)

# Retention only purges ended calls (a response exists), so an in-flight call's response
# never loses its request; a request left without one this long past the cutoff is an
# orphan (a crash lost its response) and goes too.
ORPHAN_GRACE_MS: Final = 86_400_000
LINEAGE_COLUMNS: Final = (
    "hash",
    "scope",
    "session_id",
    "chat_id",
    "node_id",
    "response_id",
    "depth",
    "parent_hash",
    "created_at",
)
