"""The store's configuration: one frozen, validated value object."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

__all__ = (
    "DEFAULT_REDACT_BODY_FIELDS",
    "DEFAULT_REDACT_HEADERS",
    "BodyRedactor",
    "Durability",
    "StoreConfig",
)

Durability = Literal["batched", "sync"]

#: Called with the parsed JSON body of a request (or a reply) before it is stored; returns
#: what to store instead. Used for PII scrubbing. It must not mutate its argument.
BodyRedactor = Callable[[Any], Any]

DEFAULT_REDACT_HEADERS: Final = (
    "Authorization",
    "Cookie",
    "X-Api-Key",
    "Proxy-Authorization",
    # Other vendors' credential headers, and cookies set by an upstream reply.
    "Set-Cookie",
    "Api-Key",
    "X-Goog-Api-Key",
    "Anthropic-Api-Key",
    "X-Anthropic-Api-Key",
    "X-Auth-Token",
    "X-Access-Token",
    "X-Amz-Security-Token",
    "Ocp-Apim-Subscription-Key",
)

#: Top-level fields of a JSON body that carry credentials (matched exactly).
DEFAULT_REDACT_BODY_FIELDS: Final = (
    "access_token",
    "accessToken",
    "apiKey",
    "api_key",
    "key",
    "secret_key",
)


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """Settings of a store; durations in seconds, sizes in bytes."""

    session_timeout: float = 1800.0
    sweep_interval: float = 600.0
    paths: tuple[str, ...] = ("/v1/chat/completions",)
    session_header: str = "X-Session-Id"
    log_retention: float | None = None
    max_body_bytes: int = 1024 * 1024
    redact_headers: tuple[str, ...] = DEFAULT_REDACT_HEADERS
    durability: Durability = "batched"
    flush_interval: float = 0.05
    #: Records held in memory while storage is failing; past it new records are dropped
    #: (and counted) so a broken disk cannot exhaust the proxy's memory.
    max_pending_records: int = 10_000
    #: Rows a sweep deletes per transaction, so a sweep never stalls the event loop.
    sweep_batch_size: int = 2_000
    #: When set (e.g. "Authorization"), session ids are derived per credential: the MD5 of
    #: the credential's SHA-256 digest joined to the first user text, so two clients opening
    #: with the same words never share an upstream chat.
    scope_header: str | None = None
    #: Optional PII hook applied to request and response bodies before they are stored.
    redact_body: BodyRedactor | None = None
    #: Headers that may also carry secrets under other names (matched case-insensitively).
    extra_redact_headers: tuple[str, ...] = field(default=())
    #: Top-level JSON body fields stored as "[REDACTED]" (requests and upstream bodies);
    #: () stores them as sent.
    redact_body_fields: tuple[str, ...] = DEFAULT_REDACT_BODY_FIELDS

    def __post_init__(self) -> None:
        if self.session_timeout <= 0:
            raise ValueError("session_timeout must be > 0 seconds")
        if self.sweep_interval <= 0:
            raise ValueError("sweep_interval must be > 0 seconds")
        if self.log_retention is not None and self.log_retention <= 0:
            raise ValueError("log_retention must be > 0 seconds or None")
        if self.max_body_bytes < 0:
            raise ValueError("max_body_bytes must be >= 0")
        if self.durability not in ("batched", "sync"):
            raise ValueError(f"durability must be 'batched' or 'sync', not {self.durability!r}")
        if self.flush_interval <= 0:
            raise ValueError("flush_interval must be > 0 seconds")
        if self.max_pending_records < 1:
            raise ValueError("max_pending_records must be >= 1")
        if self.sweep_batch_size < 1:
            raise ValueError("sweep_batch_size must be >= 1")
        if isinstance(self.paths, str):
            raise TypeError("paths must be a tuple of paths, not a string")
        # Accept any iterable of strings but store a tuple so the config stays hashable.
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "redact_headers", tuple(self.redact_headers))
        if isinstance(self.redact_body_fields, str):
            raise TypeError("redact_body_fields must be a tuple of field names, not a string")
        object.__setattr__(self, "redact_body_fields", tuple(self.redact_body_fields))

    @property
    def redacted_header_names(self) -> frozenset[str]:
        """Lower-cased names of every header that is never stored in clear."""
        return frozenset(h.lower() for h in (*self.redact_headers, *self.extra_redact_headers))

    def replace(self, **changes: Any) -> StoreConfig:
        """A copy with `changes` applied (validated again)."""
        from dataclasses import replace

        return replace(self, **changes)
