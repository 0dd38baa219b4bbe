"""Building the request and response records of one call: redaction, serialisation, truncation.

Pure record building, no I/O and no server: `RecordBuilder` turns what a call told the
middleware (a `Recording`, the request's method, path, headers and body, the reply) into the
`RequestRecord` and `ResponseRecord` the writer stores. Secrets never leave this module in
clear: credential headers and credential-looking top-level body fields are replaced by
`"[REDACTED]"`, and the optional `redact_body` hook sees every body before it is stored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from .capture import CapturedBody, ResponseCapture, body_text, one_replacement, stored_text
from .config import StoreConfig
from .hashing import first_user_text, generate_session_id, validate_session_id
from .lineage import scope_digest
from .models import (
    Outcome,
    RequestRecord,
    ResponseRecord,
    Session,
    new_request_record,
    new_response_record,
    now_ms,
)

if TYPE_CHECKING:
    from .turn import Turn

__all__ = ("REDACTED", "RecordBuilder", "Recording", "new_id")

log: Final = logging.getLogger("aiohttp_session_store.records")

#: What a secret is stored as.
REDACTED: Final = "[REDACTED]"
_REDACTION_FAILED: Final = "[redaction failed]"
# One encoder each, made once: json.dumps with any option builds a new encoder per call.
_dumps_text: Final = json.JSONEncoder(ensure_ascii=False).encode
_dumps_any: Final = json.JSONEncoder(ensure_ascii=False, default=str).encode
#: "Not set by the handler" (None is a value a handler may set).
_UNSET: Final[Any] = object()


def new_id() -> str:
    """A random 128-bit id in hex (as uuid4().hex is): a sixth of its cost, twice a call."""
    return os.urandom(16).hex()


@dataclass(slots=True)
class Recording:
    """What one call has told us so far; read when its response record is built."""

    request_id: str
    started: float
    limit: int
    session: Session | None = None
    request_queued: bool = False
    #: One id per call: a response recorded early (sync, before a stream's end) and again
    #: at the end is one row.
    response_id: str = field(default_factory=new_id)
    #: Where the manager notes the parent this call's handler set (see CURRENT_TURN).
    turn: Turn | None = None
    #: Sync durability: the stream ended before its records could be committed.
    uncommitted: bool = False
    #: What is known before the handler, kept so a call cancelled early is still recorded.
    raw: bytes | None = None
    body: Any = None
    session_id: str | None = None
    #: Sync durability: records the reply before its last bytes leave (see capture).
    before_eof: Callable[[], Awaitable[None]] | None = None
    capture: ResponseCapture | None = None
    upstream_request: Any = _UNSET
    upstream_response: Any = _UNSET
    upstream_error: str | None = None
    #: The status the response was prepared with (known once headers went out).
    status_sent: int | None = None


class RecordBuilder:
    """Builds the records of calls from the config; one per application, no per-call state."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self.redacted = config.redacted_header_names
        self.redacted_fields = frozenset(config.redact_body_fields)
        self.limit = config.max_body_bytes
        self.credential_headers = config.credential_header_names()
        self.hook_failed = False

    def headers_json(self, headers: Mapping[str, str]) -> str:
        redacted = self.redacted
        return _dumps_text(
            {k: (REDACTED if k.lower() in redacted else v) for k, v in headers.items()}
        )

    def has_secret_fields(self, value: Any) -> bool:
        return isinstance(value, dict) and not self.redacted_fields.isdisjoint(value)

    def without_secrets(self, value: Any) -> Any:
        """A top-level object with its credential-looking fields replaced (a copy)."""
        if not self.has_secret_fields(value):
            return value
        fields = self.redacted_fields
        return {k: (REDACTED if k in fields else v) for k, v in value.items()}

    def redact(self, value: Any) -> Any:
        """The body hook's result for `value`: parsed JSON, or a body's text as a str.

        A failing hook neither fails the call nor lets the body through in clear.
        """
        hook = self.config.redact_body
        if hook is None:
            return value
        try:
            return hook(value)
        except Exception:
            if not self.hook_failed:  # once, not once per call
                self.hook_failed = True
                log.exception("redact_body failed; bodies it fails on are not stored")
            return _REDACTION_FAILED

    def to_text(self, value: Any) -> str | None:
        """A body-ish value as stored: redacted, serialised, cut to the limit."""
        if value is None or value is _UNSET:
            return None
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            parsed: Any = _UNSET
            if self.redacted_fields or self.config.redact_body is not None:
                with contextlib.suppress(ValueError, RecursionError):
                    parsed = json.loads(raw)
            if self.config.redact_body is None and not self.has_secret_fields(parsed):
                decoded, cut = body_text(raw, self.limit)
                return stored_text(decoded, cut, len(raw))
            # Not JSON: the hook gets the text (a JSON string is a JSON value too).
            value = raw.decode("utf-8", "replace") if parsed is _UNSET else parsed
        value = self.redact(self.without_secrets(value))
        text: str
        if isinstance(value, str):
            text = value
        else:
            try:
                text = _dumps_any(value)
            except (ValueError, RecursionError):
                text = repr(value)
        text = one_replacement(text)
        encoded = text.encode("utf-8")
        if len(encoded) <= self.limit:
            return text
        return stored_text(encoded[: self.limit].decode("utf-8", "ignore"), True, len(encoded))

    def request_body_text(self, raw: bytes, body: Any) -> str:
        if self.config.redact_body is not None or self.has_secret_fields(body):
            redacted = self.to_text(body if body is not None else raw)
            return redacted if redacted is not None else ""
        text, cut = body_text(raw, self.limit)
        return stored_text(text, cut, len(raw))

    def reply_text(self, body: CapturedBody | None) -> str | None:
        """A reply as stored: through the body hook too (replies echo what users said)."""
        if body is None or body.text is None:
            return None
        if self.config.redact_body is None:
            return body.text
        try:
            value: Any = json.loads(body.text)
        except (ValueError, RecursionError):
            value = body.text
        return self.to_text(value)

    def first_message(self, body: Any, text: str | None) -> str | None:
        """The first user message as the sessions table keeps it: through the body hook."""
        if text is None or self.config.redact_body is None:
            return text
        return first_user_text(self.redact(body)) or ""

    def scope_of(self, headers: Mapping[str, str]) -> str:
        """The caller's scope: a digest of its credential, or "" when it sent none."""
        for name in self.credential_headers:
            value = headers.get(name)
            if value:
                return scope_digest(value, self.config.scope_key)
        if self.config.scope_header is not None:
            # An explicit scope_header: calls without it share the empty credential's scope.
            return scope_digest("", self.config.scope_key)
        return ""

    def session_id_for(
        self, headers: Mapping[str, str], body: Any, scope: str = ""
    ) -> tuple[str | None, str | None]:
        """(session id, first user text); raises InvalidSessionIdError for a bad header.

        A derived id is the MD5 of the first user text, prefixed by the caller's scope
        when there is one (so two callers never share a session).
        """
        text = first_user_text(body)
        chosen = headers.get(self.config.session_header)
        if chosen is not None:
            return validate_session_id(chosen), text
        if text is None:
            return None, None
        if scope:
            return generate_session_id(f"{scope}\x00{text}"), text
        return generate_session_id(text), text

    def request_record(
        self,
        rec: Recording,
        *,
        method: str,
        path: str,
        headers: Mapping[str, str],
        raw: bytes | None,
        body: Any,
        ts: int,
    ) -> RequestRecord:
        model = body.get("model") if isinstance(body, dict) else None
        stream = body.get("stream") is True if isinstance(body, dict) else False
        return new_request_record(
            request_id=rec.request_id,
            session_id=rec.session.id if rec.session else rec.session_id,
            timestamp=ts,
            method=method,
            path=path,
            model=model if isinstance(model, str) else None,
            stream=stream,
            openai_request=self.request_body_text(raw, body) if raw is not None else None,
            upstream_request=None,
            headers=self.headers_json(headers),
            created_at=ts,
        )

    def upstream_request_text(self, rec: Recording) -> str | None:
        """What the handler said it sent upstream (`set_upstream`), as stored."""
        return None if rec.upstream_request is _UNSET else self.to_text(rec.upstream_request)

    def response_record(
        self,
        rec: Recording,
        *,
        status: int | None,
        outcome: Outcome,
        body: CapturedBody | None,
        error: str | None,
        ended: float | None = None,
    ) -> ResponseRecord:
        """The response record of `rec` as it stands (`ended`: a perf_counter time)."""
        if rec.upstream_error is not None and outcome in ("completed", "handler_error"):
            outcome = "upstream_error"
            error = rec.upstream_error
        elif error is None and body is not None and body.stream_error is not None:
            error = self.to_text(body.stream_error)
        if ended is None:
            ended = time.perf_counter()
        turn = rec.turn
        parent_id = turn.reply_node_id if turn is not None and turn.advanced else None
        # A whole (non-streamed) body leaves in one piece once the handler has returned.
        first_byte = rec.capture.first_byte_at if rec.capture else (ended if body else None)
        summary = body.summary if body is not None else None
        ts = now_ms()
        return new_response_record(
            response_id=rec.response_id,
            request_id=rec.request_id,
            session_id=rec.session.id if rec.session else rec.session_id,
            timestamp=ts,
            status_code=status,
            outcome=outcome,
            openai_response=self.reply_text(body),
            upstream_response=self.to_text(rec.upstream_response),
            parent_id=parent_id,
            prompt_tokens=summary.prompt_tokens if summary else None,
            completion_tokens=summary.completion_tokens if summary else None,
            total_tokens=summary.total_tokens if summary else None,
            finish_reason=summary.finish_reason if summary else None,
            error=error,
            duration_ms=round((ended - rec.started) * 1000),
            first_byte_ms=(
                round((first_byte - rec.started) * 1000) if first_byte is not None else None
            ),
            created_at=ts,
        )
