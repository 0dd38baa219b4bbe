"""The store's configuration: one frozen, validated value object."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final, Literal, Union, overload

from .models import now_ms
from .timeparse import parse_duration

__all__ = (
    "DEFAULT_CREDENTIAL_HEADERS",
    "DEFAULT_REDACT_BODY_FIELDS",
    "DEFAULT_REDACT_HEADERS",
    "BodyRedactor",
    "Clock",
    "Durability",
    "Duration",
    "StoreConfig",
)

#: Integer milliseconds since the epoch, the unit of every stored time.
Clock = Callable[[], int]

#: Seconds, a timedelta, or a string such as "90s", "5m", "2h", "30d" or "1h30m".
Duration = Union[float, int, timedelta, str]  # noqa: UP007 (a runtime alias on 3.10)

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

#: Headers that identify a caller, in the order they are looked for: the first present one
#: scopes the caller's session ids and conversation lineage.
DEFAULT_CREDENTIAL_HEADERS: Final = (
    "Authorization",
    "Proxy-Authorization",
    "X-Api-Key",
    "Api-Key",
    "X-Goog-Api-Key",
    "Anthropic-Api-Key",
)


class _Seconds:
    """A duration field: set from seconds, a timedelta or "30m"; read as float seconds."""

    def __init__(self, default: float) -> None:
        self._default = default
        self._name = self._attr = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name, self._attr = name, "_" + name

    @overload
    def __get__(self, obj: None, owner: Any) -> float: ...
    @overload
    def __get__(self, obj: object, owner: Any) -> float: ...
    def __get__(self, obj: object | None, owner: Any) -> float:
        if obj is None:  # the dataclass machinery asking for the default
            return self._default
        value: float = obj.__dict__[self._attr]
        return value

    def __set__(self, obj: object, value: Duration) -> None:
        # Reached only from the generated __init__ (the frozen class refuses assignment).
        obj.__dict__[self._attr] = _seconds(self._name, value)


class _OptionalSeconds:
    """A duration field that may be None (meaning: never)."""

    def __init__(self) -> None:
        self._name = self._attr = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name, self._attr = name, "_" + name

    @overload
    def __get__(self, obj: None, owner: Any) -> float | None: ...
    @overload
    def __get__(self, obj: object, owner: Any) -> float | None: ...
    def __get__(self, obj: object | None, owner: Any) -> float | None:
        if obj is None:
            return None
        value: float | None = obj.__dict__[self._attr]
        return value

    def __set__(self, obj: object, value: Duration | None) -> None:
        obj.__dict__[self._attr] = None if value is None else _seconds(self._name, value)


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """Settings of a store; sizes in bytes.

    Durations are stored as seconds (float) and given as seconds, a `timedelta` or a
    string such as "90s", "5m", "2h", "30d" or "1h30m". Every error names its field.
    """

    session_timeout: _Seconds = _Seconds(1800.0)
    sweep_interval: _Seconds = _Seconds(600.0)
    paths: tuple[str, ...] = ("/v1/chat/completions",)
    session_header: str = "X-Session-Id"
    log_retention: _OptionalSeconds = _OptionalSeconds()
    max_body_bytes: int = 1024 * 1024
    redact_headers: tuple[str, ...] = DEFAULT_REDACT_HEADERS
    durability: Durability = "batched"
    flush_interval: _Seconds = _Seconds(0.05)
    #: Records held in memory while storage is failing; past it new records are dropped
    #: (and counted) so a broken disk cannot exhaust the proxy's memory.
    max_pending_records: int = 10_000
    #: The same bound in bytes (the records' text as held in memory, the commit in
    #: progress included): whichever bound is reached first drops new records.
    max_pending_bytes: int = 64 * 1024 * 1024
    #: Largest commit in bytes: a commit never waits behind a large one, which is what
    #: keeps the `flush_interval` promise (and the kill -9 loss window) under load.
    max_batch_bytes: int = 2 * 1024 * 1024
    #: Bytes of the first user message kept with a session (cut and marked past it, in
    #: memory and in the database); the session id is derived from the whole text.
    max_first_message_bytes: int = 4096
    #: Sessions kept in memory (a store one process owns), by count and by bytes.
    max_cached_sessions: int = 100_000
    max_cache_bytes: int = 64 * 1024 * 1024
    #: Rows a sweep deletes per transaction, so a sweep never stalls the event loop.
    sweep_batch_size: int = 2_000
    #: When set (e.g. "Authorization"), session ids are derived per credential: the MD5 of
    #: the credential's SHA-256 digest joined to the first user text, so two clients opening
    #: with the same words never share an upstream chat.
    scope_header: str | None = None
    #: Scope derived session ids and conversation lineage by the caller's credential (the
    #: first of `credential_headers` present), so two callers never share a session or an
    #: upstream chat. A request without a credential is unscoped (plain MD5 ids).
    scope_by_credential: bool = True
    credential_headers: tuple[str, ...] = DEFAULT_CREDENTIAL_HEADERS
    #: A secret for the credential digest (HMAC-SHA-256); None: plain SHA-256.
    scope_key: bytes | None = None
    #: Memory for known conversation points (lineage nodes), in bytes.
    lineage_cache_bytes: int = 16 * 1024 * 1024
    #: Age after which conversation points are swept; None keeps them.
    lineage_retention: _OptionalSeconds = _OptionalSeconds()
    #: Optional PII hook applied to request and response bodies before they are stored.
    redact_body: BodyRedactor | None = None
    #: Headers that may also carry secrets under other names (matched case-insensitively).
    extra_redact_headers: tuple[str, ...] = field(default=())
    #: Top-level JSON body fields stored as "[REDACTED]" (requests and upstream bodies);
    #: () stores them as sent.
    redact_body_fields: tuple[str, ...] = DEFAULT_REDACT_BODY_FIELDS
    #: The store's time source (integer ms since the epoch); tests inject a fake one.
    clock: Clock = now_ms
    #: Longest shutdown waits for queued records to commit while storage is failing.
    shutdown_timeout: _Seconds = _Seconds(10.0)
    #: Sync durability: the longest one call waits for its commits, all of them together
    #: (session, request, handler's session changes, response). Past it the call is
    #: answered 503 (a stream that already started is marked in its record instead).
    sync_commit_timeout: _Seconds = _Seconds(5.0)

    def __post_init__(self) -> None:
        _int_at_least("max_body_bytes", self.max_body_bytes, 0)
        for name, least in (
            ("max_pending_records", 1),
            ("max_pending_bytes", 1),
            ("max_batch_bytes", 1),
            ("max_first_message_bytes", 64),
            ("max_cached_sessions", 1),
            ("max_cache_bytes", 1),
            ("sweep_batch_size", 1),
            ("lineage_cache_bytes", 0),
        ):
            _int_at_least(name, getattr(self, name), least)
        if self.durability not in ("batched", "sync"):
            raise ValueError(f"durability: must be 'batched' or 'sync', not {self.durability!r}")
        if not callable(self.clock):
            raise TypeError(f"clock: must be a callable returning ms, not {self.clock!r}")
        if self.scope_key is not None and not isinstance(self.scope_key, bytes):
            raise TypeError("scope_key: must be bytes or None")
        for name in (
            "paths",
            "redact_headers",
            "extra_redact_headers",
            "credential_headers",
            "redact_body_fields",
        ):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)):
                raise TypeError(f"{name}: must be a tuple of strings, not a string")
            try:
                items = tuple(value)
            except TypeError:
                raise TypeError(f"{name}: must be a tuple of strings, not {value!r}") from None
            if not all(isinstance(item, str) for item in items):
                raise TypeError(f"{name}: must be a tuple of strings, not {value!r}")
            # Any iterable of strings is accepted; a tuple keeps the config hashable.
            self._set(name, items)
        for name in ("session_header",):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"{name}: must be a non-empty string")
        if self.scope_header is not None and (
            not isinstance(self.scope_header, str) or not self.scope_header
        ):
            raise TypeError("scope_header: must be a non-empty string or None")
        if self.redact_body is not None and not callable(self.redact_body):
            raise TypeError("redact_body: must be a callable or None")

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    @property
    def redacted_header_names(self) -> frozenset[str]:
        """Lower-cased names of every header that is never stored in clear."""
        return frozenset(h.lower() for h in (*self.redact_headers, *self.extra_redact_headers))

    def credential_header_names(self) -> tuple[str, ...]:
        """The headers whose value scopes a caller, in the order they are looked for."""
        if self.scope_header is not None:
            return (self.scope_header,)
        return self.credential_headers if self.scope_by_credential else ()

    def replace(self, **changes: Any) -> StoreConfig:
        """A copy with `changes` applied (validated again)."""
        from dataclasses import replace

        return replace(self, **changes)


def _seconds(name: str, value: object) -> float:
    """A duration field's value as positive seconds; errors name the field."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected seconds, a timedelta or a string such as '30m'")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    else:
        raise TypeError(
            f"{name}: expected seconds, a timedelta or a string such as '30m',"
            f" not {type(value).__name__}"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{name}: must be > 0 seconds, not {value!r}")
    return seconds


def _int_at_least(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: must be an integer number of bytes or items, not {value!r}")
    if value < least:
        raise ValueError(f"{name}: must be >= {least}, not {value}")
