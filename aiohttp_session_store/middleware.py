"""The aiohttp middleware: a session before each handler, one request and one response record.

Everything per call lives in one `Recording` held by the request; nothing is shared between
requests. Records are handed to the writer without awaiting it (in batched durability), and
the response record is handed over in a `finally`, so a cancelled handler still records.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

from aiohttp import web

from .capture import (
    CapturedBody,
    ResponseCapture,
    body_text,
    is_event_stream,
    stored_text,
    summarize_body,
)
from .config import StoreConfig
from .errors import InvalidSessionIdError
from .hashing import first_user_text, generate_session_id, validate_session_id
from .lineage import scope_digest
from .manager import SessionManager
from .models import Outcome, RequestRecord, ResponseRecord, Session, now_ms
from .turn import CURRENT_TURN, Turn

__all__ = (
    "RECORDING_KEY",
    "SESSION_KEY",
    "Recording",
    "make_middleware",
    "on_response_prepare",
)

log: Final = logging.getLogger("aiohttp_session_store.middleware")

_T = TypeVar("_T")


def _request_key(name: str, kind: type[_T]) -> web.RequestKey[_T]:
    """A typed request key where aiohttp has them (>= 3.13); a namespaced string before."""
    factory = getattr(web, "RequestKey", None)
    return factory(name, kind) if factory is not None else name  # type: ignore[return-value]


SESSION_KEY: Final = _request_key("aiohttp_session_store.session", object)

if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_UNSET: Final[Any] = object()
_REDACTED: Final = "[REDACTED]"
# A POST to a path ending so, outside `paths`, is most likely a chat route the user forgot.
_CHAT_SUFFIX: Final = "/chat/completions"
_REDACTION_FAILED: Final = "[redaction failed]"


@dataclass(slots=True)
class Recording:
    """What one call has told us so far; read when its response record is written."""

    request_id: str
    started: float
    limit: int
    session: Session | None = None
    request_queued: bool = False
    response_queued: bool = False
    #: One id per call: a response recorded early (sync, before a stream's end) and again
    #: at the end is one row.
    response_id: str = field(default_factory=lambda: _new_id())
    recorded_early: bool = False
    #: Where the manager notes the parent this call's handler set (see CURRENT_TURN).
    turn: Turn | None = None
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


RECORDING_KEY: Final = _request_key("aiohttp_session_store.recording", Recording)


def _new_id() -> str:
    """A random 128-bit id in hex (as uuid4().hex is): a sixth of its cost, twice a call."""
    return os.urandom(16).hex()


def _error_response(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": None}}, status=status
    )


class _Recorder:
    """Builds the records of one call from the config; bound once per application."""

    def __init__(self, manager: SessionManager, config: StoreConfig) -> None:
        self.manager = manager
        self.writer = manager.writer
        self.config = config
        self.redacted = config.redacted_header_names
        self.limit = config.max_body_bytes
        self.sync = config.durability == "sync"
        self.credential_headers = config.credential_header_names()
        self.hook_failed = False

    async def commit(self) -> None:
        """In sync durability, wait (boundedly) until what this call queued is committed."""
        if not self.sync:
            return
        # The writer keeps retrying and counts what it drops; the proxy keeps serving.
        await self.manager.commit_bounded()

    def headers_json(self, headers: Mapping[str, str]) -> str:
        redacted = self.redacted
        return json.dumps(
            {k: (_REDACTED if k.lower() in redacted else v) for k, v in headers.items()},
            ensure_ascii=False,
        )

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
        """A body-ish value as stored: redacted by the hook, serialised, cut to the limit."""
        if value is None or value is _UNSET:
            return None
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            if self.config.redact_body is None:
                decoded, cut = body_text(raw, self.limit)
                return stored_text(decoded, cut, len(raw))
            try:
                value = json.loads(raw)
            except (ValueError, RecursionError):
                # Not JSON: the hook gets the text (a JSON string is a JSON value too).
                value = raw.decode("utf-8", "replace")
        if self.config.redact_body is not None:
            value = self.redact(value)
        text: str
        if isinstance(value, str):
            text = value
        else:
            try:
                text = json.dumps(value, ensure_ascii=False, default=str)
            except (ValueError, RecursionError):
                text = repr(value)
        encoded = text.encode("utf-8", "surrogatepass")
        if len(encoded) <= self.limit:
            return text
        return stored_text(encoded[: self.limit].decode("utf-8", "ignore"), True, len(encoded))

    def request_body_text(self, raw: bytes, body: Any) -> str:
        if self.config.redact_body is not None:
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

    def scope_of(self, request: web.Request) -> str:
        """The caller's scope: a digest of its credential, or "" when it sent none."""
        for name in self.credential_headers:
            value = request.headers.get(name)
            if value:
                return scope_digest(value, self.config.scope_key)
        if self.config.scope_header is not None:
            # An explicit scope_header: calls without it share the empty credential's scope.
            return scope_digest("", self.config.scope_key)
        return ""

    def session_id_for(
        self, request: web.Request, body: Any, scope: str
    ) -> tuple[str | None, str | None]:
        """(session id, first user text); raises InvalidSessionIdError for a bad header."""
        text = first_user_text(body)
        chosen = request.headers.get(self.config.session_header)
        if chosen is not None:
            return validate_session_id(chosen), text
        if text is None:
            return None, None
        if scope:
            return generate_session_id(f"{scope}\x00{text}"), text
        return generate_session_id(text), text

    def queue_request(
        self, request: web.Request, rec: Recording, raw: bytes | None, body: Any, ts: int
    ) -> None:
        model = body.get("model") if isinstance(body, dict) else None
        stream = body.get("stream") is True if isinstance(body, dict) else False
        record = RequestRecord(
            request_id=rec.request_id,
            session_id=rec.session.id if rec.session else rec.session_id,
            timestamp=ts,
            method=request.method,
            path=request.path,
            model=model if isinstance(model, str) else None,
            stream=stream,
            openai_request=self.request_body_text(raw, body) if raw is not None else None,
            upstream_request=None,
            headers=self.headers_json(request.headers),
            created_at=ts,
        )
        rec.request_queued = self.writer.put_request(record)

    def queue_response(
        self,
        rec: Recording,
        *,
        status: int | None,
        outcome: Outcome,
        body: CapturedBody | None,
        error: str | None,
        again: bool = False,
    ) -> None:
        """Hand the response record over. Synchronous: safe in a `finally` after a cancel.

        `again` replaces a record handed over earlier for this call (same response_id).
        """
        if rec.response_queued and not again:
            return
        rec.response_queued = True
        if not rec.request_queued:
            return  # its request was dropped (storage failing): a lone response would dangle
        if rec.upstream_error is not None and outcome in ("completed", "handler_error"):
            outcome = "upstream_error"
            error = rec.upstream_error
        elif error is None and body is not None and body.stream_error is not None:
            error = self.to_text(body.stream_error)
        ended = time.perf_counter()
        turn = rec.turn
        parent_id = turn.reply_node_id if turn is not None and turn.advanced else None
        # A whole (non-streamed) body leaves in one piece once the handler has returned.
        first_byte = rec.capture.first_byte_at if rec.capture else (ended if body else None)
        summary = body.summary if body is not None else None
        ts = now_ms()
        if rec.upstream_request is not _UNSET:
            upstream = self.to_text(rec.upstream_request)
            if upstream is not None:
                self.writer.put_upstream_request(rec.request_id, upstream)
        record = ResponseRecord(
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
        self.writer.put_response(record)
        if turn is not None and outcome == "completed" and status is not None and status < 400:
            self.record_lineage(turn, body, rec.response_id, ts)

    def record_lineage(
        self, turn: Turn, body: CapturedBody | None, response_id: str, now: int
    ) -> None:
        """The point of the conversation this call reached, once its reply went out whole."""
        if not turn.advanced or body is None or body.truncated or body.text is None:
            return
        try:
            reply = json.loads(body.text)
        except (ValueError, RecursionError):
            return
        self.manager.lineage.complete(turn, reply, response_id=response_id, now=now)

    def reply_body(self, response: web.StreamResponse, rec: Recording) -> CapturedBody | None:
        if rec.capture is not None:
            return rec.capture.result()
        if isinstance(response, web.Response):
            data = response.body
            if isinstance(data, (bytes, bytearray)):
                if is_event_stream(response):
                    return summarize_body(bytes(data), self.limit, sse=True)
                body = summarize_body(bytes(data), self.limit)
                body.text = stored_text(body.text or "", body.truncated, len(data))
                return body
        return None


def make_middleware(manager: SessionManager, config: StoreConfig) -> Middleware:
    """The middleware for one store; `paths` decide which requests it touches."""
    recorder = _Recorder(manager, config)
    paths = frozenset(config.paths)
    # One bool, not a set of paths: the warning is said once, and nothing grows per path.
    warned = False

    def _warn_unrecorded(path: str, recorded: frozenset[str]) -> None:
        nonlocal warned
        warned = True
        log.warning(
            "POST %r looks like a chat completions route but is not in StoreConfig.paths %s:"
            " it is not recorded (add it to paths to record it); said once",
            path,
            sorted(recorded),
        )

    @web.middleware
    async def session_store_middleware(
        request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if request.path not in paths:
            if not warned and request.method == "POST" and request.path.endswith(_CHAT_SUFFIX):
                _warn_unrecorded(request.path, paths)
            return await handler(request)
        return await _handle(recorder, request, handler)

    return session_store_middleware


async def _handle(
    recorder: _Recorder, request: web.Request, handler: Handler
) -> web.StreamResponse:
    rec = Recording(
        request_id=_new_id(),
        started=time.perf_counter(),
        limit=recorder.limit,
    )
    ts = now_ms()
    request[RECORDING_KEY] = rec
    try:
        raw, body, early = await _before_handler(recorder, request, rec)
    except (asyncio.CancelledError, ConnectionResetError) as exc:
        # The client left while the body was read or the session resolved: still one
        # request row and one response row, as for every call on a session path.
        # Cancelled with handler_cancellation=True; without it (run_app's default) the
        # read itself fails with ConnectionResetError("Connection lost").
        error = "cancelled" if isinstance(exc, asyncio.CancelledError) else repr(exc)
        recorder.queue_request(request, rec, rec.raw, rec.body, ts)
        recorder.queue_response(
            rec, status=None, outcome="client_disconnected", body=None, error=error
        )
        raise
    request[SESSION_KEY] = rec.session
    try:
        recorder.queue_request(request, rec, raw, body, ts)
    except Exception:
        # Recording must never turn a served call into a failed one.
        log.exception("cannot record the request %s", rec.request_id)
    try:
        await recorder.commit()
    except asyncio.CancelledError:
        recorder.queue_response(
            rec, status=None, outcome="client_disconnected", body=None, error="cancelled"
        )
        raise
    if early is not None:
        try:
            recorder.queue_response(
                rec,
                status=early.status,
                outcome="completed",
                body=recorder.reply_body(early, rec),
                error=early.text,
            )
        except Exception:
            log.exception("cannot record the response of %s", rec.request_id)
        await recorder.commit()
        return early
    return await _run_handler(recorder, request, handler, rec)


async def _before_handler(
    recorder: _Recorder, request: web.Request, rec: Recording
) -> tuple[bytes | None, Any, web.Response | None]:
    """Read the body and resolve the session: (raw body, parsed body, early reply)."""
    raw: bytes | None = None
    body: Any = None
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        reason = exc.text or "request body too large"
        return None, None, _error_response(413, reason, "invalid_request_error")
    except web.RequestPayloadError:
        # e.g. "Content-Encoding: gzip" over bytes that are not gzip: the client's fault.
        reason = "the request body cannot be decoded (check Content-Encoding)"
        return None, None, _error_response(400, reason, "invalid_request_error")
    rec.raw = raw
    if raw:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
    rec.body = body
    scope = recorder.scope_of(request)
    try:
        session_id, text = recorder.session_id_for(request, body, scope)
    except InvalidSessionIdError as exc:
        message = f"{recorder.config.session_header}: {exc}"
        return raw, body, _error_response(400, message, "invalid_request_error")
    manager = recorder.manager
    try:
        if session_id is not None:
            rec.session_id = session_id
            rec.session = await manager.resolve_session(
                session_id, first_user_message=recorder.first_message(body, text)
            )
        messages = body.get("messages") if isinstance(body, dict) else None
        if isinstance(messages, list):
            rec.turn = await manager.lineage.resolve(messages, scope=scope, session=rec.session)
            rec.turn.manager = manager
    except asyncio.CancelledError:
        raise
    except Exception:
        # Without its chat/parent ids a stateful upstream would silently start a new
        # conversation; a retryable 503 is the honest answer.
        log.exception("cannot resolve session %s", session_id)
        early = _error_response(
            503, "the session store is unavailable; retry shortly", "server_error"
        )
        early.headers["Retry-After"] = "1"
        return raw, body, early
    return raw, body, None


async def _run_handler(
    recorder: _Recorder, request: web.Request, handler: Handler, rec: Recording
) -> web.StreamResponse:
    outcome: Outcome = "completed"
    status: int | None = None
    error: str | None = None
    response: web.StreamResponse | None = None
    if recorder.sync:

        async def record_before_eof() -> None:
            capture = rec.capture
            if capture is None:
                return
            failed = capture.write_error
            recorder.queue_response(
                rec,
                status=rec.status_sent,
                outcome="client_disconnected" if failed else "completed",
                body=capture.result(),
                error=repr(failed) if failed else None,
            )
            rec.recorded_early = True
            await recorder.commit()

        rec.before_eof = record_before_eof
    turn_token = CURRENT_TURN.set(rec.turn)
    try:
        response = await handler(request)
        status = response.status
        capture = rec.capture
        if capture is not None and capture.write_error is not None:
            outcome, error = "client_disconnected", repr(capture.write_error)
        return response
    except web.HTTPException as exc:
        status = exc.status
        error = exc.text if exc.status >= 400 else None
        outcome = "handler_error" if exc.status >= 500 else "completed"
        response = exc
        raise
    except asyncio.CancelledError:
        # aiohttp cancels a handler whose client went away (handler_cancellation=True).
        outcome, error = "client_disconnected", "handler cancelled"
        status = rec.status_sent
        raise
    except (ConnectionResetError, BrokenPipeError) as exc:
        outcome, error = "client_disconnected", repr(exc)
        status = rec.status_sent
        raise
    except Exception as exc:
        outcome, error = "handler_error", f"{type(exc).__name__}: {exc}"
        # Nothing sent yet: aiohttp answers the client with a 500 for us.
        status = rec.status_sent or 500
        raise
    finally:
        CURRENT_TURN.reset(turn_token)
        try:
            body = (
                recorder.reply_body(response, rec)
                if response is not None
                else (rec.capture.result() if rec.capture is not None else None)
            )
            recorder.queue_response(
                rec,
                status=status,
                outcome=outcome,
                body=body,
                error=error,
                again=rec.recorded_early,
            )
        except Exception:
            # Recording must never turn a served call into a failed one.
            log.exception("cannot record the response of %s", rec.request_id)
        if outcome != "client_disconnected":
            await recorder.commit()


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Tee streamed replies of recorded calls (a signal handler, registered by `setup`)."""
    rec = request.get(RECORDING_KEY)
    if not isinstance(rec, Recording) or rec.capture is not None:
        return
    rec.status_sent = response.status
    if isinstance(response, web.Response):
        return  # its body is read whole from the response object afterwards
    capture = ResponseCapture(limit=rec.limit)
    capture.before_eof = rec.before_eof
    capture.attach(response)
    rec.capture = capture
