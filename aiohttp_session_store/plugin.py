"""`setup(app, ...)`: wiring a SessionStore into an aiohttp application, and its accessors."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web

from .backends.base import Backend
from .config import StoreConfig
from .errors import StoreUnavailableError
from .manager import SessionManager
from .middleware import (
    _UNSET,
    RECORDING_KEY,
    SESSION_KEY,
    Recording,
    make_middleware,
    on_response_prepare,
)
from .models import Session
from .turn import Turn

if TYPE_CHECKING:
    from .metrics import StoreMetrics

__all__ = (
    "STORE_KEY",
    "SessionStore",
    "get_session",
    "get_store",
    "get_turn",
    "mark_upstream_error",
    "set_upstream",
    "setup",
)


class SessionStore:
    """What `setup()` made: the manager, its backend and config, open while the app runs."""

    def __init__(self, manager: SessionManager) -> None:
        self.manager = manager
        self.config = manager.config
        #: Set by `enable_metrics` (or the first `metrics_app()`); None until then.
        self.metrics: StoreMetrics | None = None

    @property
    def backend(self) -> Backend:
        return self.manager.backend

    async def open(self) -> None:
        await self.manager.open()

    def query_app(self, *, token: str, admin: bool = False) -> web.Application:
        """A JSON API over this store, to mount with `app.add_subapp`.

        Every request needs `Authorization: Bearer <token>`. Read-only unless `admin` is
        true, which adds the admin routes that change the store (`DELETE /sessions/{id}`).
        """
        from .query import create_query_app

        return create_query_app(self.manager, token=token, admin=admin)

    def metrics_app(self, *, token: str | None = None) -> web.Application:
        """Prometheus metrics of this store at ``GET /metrics``, to mount with `app.add_subapp`.

        Enables metrics on first use (needs the ``metrics`` extra: ``prometheus-client``).
        With `token`, every scrape needs ``Authorization: Bearer <token>``.
        """
        from .metrics import create_metrics_app, enable_metrics

        return create_metrics_app(enable_metrics(self), token=token)

    async def flush(self) -> None:
        """Wait until every record and session change queued so far is committed."""
        await self.manager.writer.flush()

    async def close(self) -> None:
        """Commit everything queued, stop the sweeper and writer, close the backend."""
        await self.manager.shutdown()

    @property
    def ready(self) -> bool:
        """True while the store is open. False while a database that was unreachable at
        startup is still being waited for: session calls then answer 503."""
        return self.manager.opened

    async def _lifespan(self, app: web.Application) -> AsyncIterator[None]:
        opener: asyncio.Task[None] | None = None
        try:
            await self.open()
        except StoreUnavailableError as exc:
            # Start anyway: the proxy answers 503 (and /health says not ready) until the
            # database is back, then serves, with no restart.
            log.warning(
                "session store unavailable at startup (%s); retrying in the background", exc
            )
            opener = asyncio.get_running_loop().create_task(
                self._open_when_back(), name="aiohttp_session_store.open"
            )
        self.manager.start_cleanup()
        try:
            yield
        finally:
            if opener is not None:
                opener.cancel()
                # wait(), not `await opener`: its cancellation is expected, ours must propagate.
                await asyncio.wait({opener})
            await self.close()

    async def _open_when_back(self) -> None:
        delay = _REOPEN_FIRST_DELAY
        while True:
            await asyncio.sleep(delay)
            try:
                await self.open()
            except StoreUnavailableError as exc:
                log.debug("session store still unavailable: %s", exc)
                delay = min(delay * 2, _REOPEN_MAX_DELAY)
            else:
                log.warning("session store reachable again: serving sessions")
                return

    def __repr__(self) -> str:
        return f"<SessionStore backend={self.backend.name} paths={self.config.paths}>"


STORE_KEY: Final = web.AppKey("aiohttp_session_store", SessionStore)

log: Final = logging.getLogger("aiohttp_session_store")

# Retrying a database that was down at startup: soon at first, then at most every few
# seconds, so a long outage costs a connection attempt now and then, not a busy loop.
_REOPEN_FIRST_DELAY: Final = 0.1
_REOPEN_MAX_DELAY: Final = 5.0


def setup(
    app: web.Application,
    database: str | os.PathLike[str] | Backend = "data/sessions.db",
    *,
    config: StoreConfig | None = None,
) -> SessionStore:
    """Add sessions and request/response records to `app`; return the store it made.

    `database` is a path, `sqlite:///path`, `postgresql://...` or a Backend instance. The
    store opens when the app starts (in `cleanup_ctx`) and commits everything on shutdown.
    """
    if STORE_KEY in app:
        raise RuntimeError("aiohttp_session_store.setup() was already called for this app")
    store = SessionStore(SessionManager(database, config=config))
    app[STORE_KEY] = store
    app.middlewares.append(make_middleware(store.manager, store.config))
    app.on_response_prepare.append(on_response_prepare)
    app.cleanup_ctx.append(store._lifespan)
    return store


def get_store(app_or_request: web.Application | web.Request) -> SessionStore:
    """The store `setup()` attached (to the app, or to a request's app or its parents)."""
    store: SessionStore | None
    if isinstance(app_or_request, web.Request):
        # config_dict chains a sub-application's state to its parents'.
        store = app_or_request.config_dict.get(STORE_KEY)
    else:
        store = app_or_request.get(STORE_KEY)
    if store is None:
        raise RuntimeError(
            "no session store on this application: call aiohttp_session_store.setup(app) first"
        )
    return store


def get_session(request: web.BaseRequest) -> Session | None:
    """The session resolved before this handler ran.

    None when the path is not a session path, or the body had no user message (and no
    session header).
    """
    session = request.get(SESSION_KEY)
    return session if isinstance(session, Session) else None


def get_turn(request: web.BaseRequest) -> Turn | None:
    """Where this call continues its upstream conversation (see `Turn`).

    `turn.chat_id` / `turn.parent_id`: the upstream chat and node to continue (None: start
    a new chat); `turn.messages`: exactly the messages the upstream has not seen on that
    branch (the whole history when nothing is known). After the upstream answered, report
    the node the reply became with `await turn.advance(chat_id=..., node_id=...)`.
    None when the path is not recorded or the body has no `messages` list.
    """
    rec = request.get(RECORDING_KEY)
    return rec.turn if isinstance(rec, Recording) else None


def _recording(request: web.BaseRequest) -> Recording:
    rec = request.get(RECORDING_KEY)
    if not isinstance(rec, Recording):
        raise RuntimeError(
            "this request is not recorded: its path is not in StoreConfig.paths, "
            "or aiohttp_session_store.setup(app) was not called"
        )
    return rec


def set_upstream(
    request: web.BaseRequest, *, request_body: Any = _UNSET, response_body: Any = _UNSET
) -> None:
    """Attach what the handler sent to / received from its upstream to this call's records.

    Values may be JSON-serialisable objects, str or bytes; they go through the same body
    redaction hook and size limit as the client's bodies.
    """
    rec = _recording(request)
    if request_body is not _UNSET:
        rec.upstream_request = request_body
    if response_body is not _UNSET:
        rec.upstream_response = response_body


def mark_upstream_error(request: web.BaseRequest, error: str) -> None:
    """Record this call's outcome as `upstream_error`, with `error` as its message."""
    _recording(request).upstream_error = error
