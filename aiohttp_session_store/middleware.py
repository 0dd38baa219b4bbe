"""The aiohttp middleware: the flow of one recorded call, and the tee of its streamed reply.

Before the handler: read the body, resolve the session, queue the request record. Then run
the handler. Then `finish` once, in a `finally`, so a cancelled handler still records: the
response record is handed to the writer without awaiting it (in batched durability). What the
records hold (redaction, serialisation, truncation) is built in `records`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from aiohttp import web

from .capture import CapturedBody, ResponseCapture, response_body
from .completion import json_loads
from .config import StoreConfig
from .errors import InvalidSessionIdError, StoreError
from .manager import CALL_COMMITS, SessionManager
from .models import Outcome, now_ms
from .records import _UNSET as _UNSET  # plugin's "not set" marker
from .records import RecordBuilder, Recording, new_id
from .turn import CURRENT_TURN

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

RECORDING_KEY: Final = _request_key("aiohttp_session_store.recording", Recording)

#: The error a sync-durability stream's record carries when it ended before its commit.
UNCOMMITTED_STREAM: Final = "sync durability: the stream ended before its records were committed"

# A POST to a path ending so, outside `paths`, is most likely a chat route the user forgot.
_CHAT_SUFFIX: Final = "/chat/completions"


@dataclass(slots=True)
class _End:
    """How a call ended, as far as the middleware saw it: what its one `finish` records."""

    status: int | None = None
    outcome: Outcome = "completed"
    error: str | None = None
    response: web.StreamResponse | None = None


def _error_response(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "code": None}}, status=status
    )


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class _Recorder:
    """Hands one application's records to its writer; bound once per application."""

    def __init__(self, manager: SessionManager, config: StoreConfig) -> None:
        self.manager = manager
        self.writer = manager.writer
        self.config = config
        self.build = RecordBuilder(config)
        self.limit = config.max_body_bytes
        self.sync = config.durability == "sync"
        self.store_failing = False

    async def commit(self) -> bool:
        """In sync durability, wait (boundedly) until what this call queued is committed.

        False when it could not be (storage failing): the writer keeps retrying and counts
        what it drops, and the caller tells the client.
        """
        if not self.sync:
            return True
        return await self.manager.commit_bounded()

    def queue_request(
        self, request: web.Request, rec: Recording, raw: bytes | None, body: Any, ts: int
    ) -> None:
        record = self.build.request_record(
            rec,
            method=request.method,
            path=request.path,
            headers=request.headers,
            raw=raw,
            body=body,
            ts=ts,
        )
        rec.request_queued = self.writer.put_request(record)

    def put_response(
        self,
        rec: Recording,
        *,
        status: int | None,
        outcome: Outcome,
        body: CapturedBody | None,
        error: str | None,
    ) -> None:
        """Hand over the response record of `rec` as it stands (the same row each time)."""
        if not rec.request_queued:
            return  # its request was dropped (storage failing): a lone response would dangle
        upstream = self.build.upstream_request_text(rec)
        if upstream is not None:
            self.writer.put_upstream_request(rec.request_id, upstream)
        self.writer.put_response(
            self.build.response_record(rec, status=status, outcome=outcome, body=body, error=error)
        )

    def finish(self, rec: Recording, end: _End) -> None:
        """Record how the call ended: once per call. Synchronous: safe after a cancel."""
        try:
            body = response_body(end.response, rec.capture, self.limit)
            error = end.error
            if rec.uncommitted and error is None:
                error = UNCOMMITTED_STREAM
            self.put_response(rec, status=end.status, outcome=end.outcome, body=body, error=error)
            if end.outcome == "completed" and end.status is not None and end.status < 400:
                self.record_lineage(rec, body)
        except Exception:
            # Recording must never turn a served call into a failed one.
            log.exception("cannot record the response of %s", rec.request_id)

    def record_lineage(self, rec: Recording, body: CapturedBody | None) -> None:
        """The point of the conversation this call reached, once its reply went out whole."""
        turn = rec.turn
        if turn is None or not turn.advanced or body is None or body.truncated:
            return
        reply = body.reply
        if reply is None:
            return
        self.manager.lineage.complete(turn, reply, response_id=rec.response_id, now=now_ms())


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
    rec = Recording(request_id=new_id(), started=time.perf_counter(), limit=recorder.limit)
    request[RECORDING_KEY] = rec
    end = _End()
    if not recorder.sync:
        try:
            return await _serve(recorder, request, handler, rec, end)
        finally:
            recorder.finish(rec, end)
    # Sync durability: one bounded wait per call, shared by every commit point in it.
    budget = CALL_COMMITS.set(recorder.manager.call_commits())
    try:
        response = await _serve(recorder, request, handler, rec, end)
    except BaseException:
        recorder.finish(rec, end)
        if end.outcome != "client_disconnected":
            await recorder.commit()
        raise
    finally:
        CALL_COMMITS.reset(budget)
    recorder.finish(rec, end)
    if await recorder.commit() or response.prepared:
        return response
    # Its records could not be made durable before its status went out: the client is
    # told to retry rather than shown a success the store may lose.
    log.warning("call %s answered 503: its records are not committed", rec.request_id)
    end.status, end.outcome = 503, "handler_error"
    end.error = f"not committed within {recorder.manager.sync_commit_timeout}s (storage failing)"
    end.response = None
    recorder.finish(rec, end)
    failed = _error_response(503, "the session store cannot commit; retry shortly", "server_error")
    failed.headers["Retry-After"] = "1"
    return failed


async def _serve(
    recorder: _Recorder, request: web.Request, handler: Handler, rec: Recording, end: _End
) -> web.StreamResponse:
    """Everything before `finish`: it notes in `end` how the call ended."""
    ts = now_ms()
    try:
        raw, body, early = await _before_handler(recorder, request, rec)
    except (asyncio.CancelledError, ConnectionResetError) as exc:
        # The client left while the body was read or the session resolved: still one
        # request row and one response row, as for every call on a session path.
        # Cancelled with handler_cancellation=True; without it (run_app's default) the
        # read itself fails with ConnectionResetError("Connection lost").
        end.outcome = "client_disconnected"
        end.error = "cancelled" if isinstance(exc, asyncio.CancelledError) else repr(exc)
        recorder.queue_request(request, rec, rec.raw, rec.body, ts)
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
        end.outcome, end.error = "client_disconnected", "cancelled"
        raise
    if early is not None:
        end.status, end.error, end.response = early.status, early.text, early
        return early
    return await _run_handler(recorder, request, handler, rec, end)


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
            body = json_loads(raw)
        except (ValueError, RecursionError):
            body = None
    rec.body = body
    build = recorder.build
    scope = build.scope_of(request.headers)
    try:
        session_id, text = build.session_id_for(request.headers, body, scope)
    except InvalidSessionIdError as exc:
        message = f"{recorder.config.session_header}: {exc}"
        return raw, body, _error_response(400, message, "invalid_request_error")
    manager = recorder.manager
    try:
        if session_id is not None:
            rec.session_id = session_id
            rec.session = await manager.resolve_session(
                session_id, first_user_message=build.first_message(body, text)
            )
        messages = body.get("messages") if isinstance(body, dict) else None
        if isinstance(messages, list):
            # Where this history continues its upstream conversation (see `turn`).
            rec.turn = await manager.lineage.resolve(messages, scope=scope, session=rec.session)
            rec.turn.manager = manager
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # Without its chat/parent ids a stateful upstream would silently start a new
        # conversation; a retryable 503 is the honest answer.
        if isinstance(exc, StoreError):
            if not recorder.store_failing:  # once per outage, not once per call
                recorder.store_failing = True
                log.warning("session store unavailable (%s): answering 503 until it is back", exc)
        else:
            log.exception("cannot resolve the session or conversation of %s", rec.request_id)
        early = _error_response(
            503, "the session store is unavailable; retry shortly", "server_error"
        )
        early.headers["Retry-After"] = "1"
        return raw, body, early
    recorder.store_failing = False
    return raw, body, None


async def _run_handler(
    recorder: _Recorder, request: web.Request, handler: Handler, rec: Recording, end: _End
) -> web.StreamResponse:
    if recorder.sync:

        async def record_before_eof() -> None:
            # A checkpoint, not the finish: the same row, replaced when the call ends.
            capture = rec.capture
            if capture is None:
                return
            failed = capture.write_error
            outcome: Outcome = "client_disconnected" if failed else "completed"
            error = repr(failed) if failed else None
            body = capture.result()
            recorder.put_response(
                rec, status=rec.status_sent, outcome=outcome, body=body, error=error
            )
            if not await recorder.commit():
                # The stream's end goes out anyway (its status went long ago); its record,
                # committed later, says it was not durable when the client got it.
                rec.uncommitted = True
                log.warning("stream %s ended before its records were committed", rec.request_id)
                recorder.put_response(
                    rec,
                    status=rec.status_sent,
                    outcome=outcome,
                    body=body,
                    error=error or UNCOMMITTED_STREAM,
                )

        rec.before_eof = record_before_eof
    turn_token = CURRENT_TURN.set(rec.turn)
    try:
        response = end.response = await handler(request)
        end.status = response.status
        capture = rec.capture
        if capture is not None and capture.write_error is not None:
            end.outcome, end.error = "client_disconnected", repr(capture.write_error)
        elif not response.prepared and _client_gone(request):
            # A whole reply is written after we return: to a closed transport, never.
            end.outcome, end.error = "client_disconnected", "client left before the reply"
            end.status = None
        return response
    except web.HTTPException as exc:
        end.status = exc.status
        end.error = exc.text if exc.status >= 400 else None
        end.outcome = "handler_error" if exc.status >= 500 else "completed"
        end.response = exc
        raise
    except asyncio.CancelledError:
        # aiohttp cancels a handler whose client went away (handler_cancellation=True).
        end.outcome, end.error = "client_disconnected", "handler cancelled"
        end.status = rec.status_sent
        raise
    except (ConnectionResetError, BrokenPipeError) as exc:
        end.outcome, end.error = "client_disconnected", repr(exc)
        end.status = rec.status_sent
        raise
    except Exception as exc:
        end.outcome, end.error = "handler_error", f"{type(exc).__name__}: {exc}"
        # Nothing sent yet: aiohttp answers the client with a 500 for us.
        end.status = rec.status_sent or 500
        raise
    finally:
        CURRENT_TURN.reset(turn_token)


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
