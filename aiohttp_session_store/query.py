"""The query API: a bearer-protected aiohttp sub-application over a SessionManager.

Read-only unless created with ``admin=True``, which adds the admin routes that change the
store (``DELETE /sessions/{id}``). It also serves the conversation viewer's HTML pages under
``/viewer/`` (viewer.py).

Mounted by the user (``app.add_subapp("/admin", store.query_app(token=...))``). Its JSON
shapes come from views.py, which the CLI's ``--json`` output shares (docs/cli.md).

Reads go straight to the database and never wait for the record writer: a call that has
just finished appears within `StoreConfig.flush_interval` (50 ms by default). Waiting for a
flush instead would let a polling dashboard force a commit per poll, and make the admin API
hang exactly when storage is failing and it is most needed.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timezone
from typing import Any, Final, Literal, NoReturn, cast

from aiohttp import web

from . import viewer
from .backends.base import Backend
from .errors import StoreError
from .manager import SessionManager
from .models import (
    SESSION_ORDERS,
    RequestQuery,
    Session,
    SessionOrder,
    SessionQuery,
    now_ms,
)
from .prefixes import AmbiguousIdError, resolve_id
from .timeparse import parse_time
from .tree import build_tree, exchanges_by_response, tree_json
from .views import exchange_json, hit_json, session_json

__all__ = ("MAX_PAGE", "MIN_TOKEN_LENGTH", "create_query_app")

log: Final = logging.getLogger("aiohttp_session_store.query")

MIN_TOKEN_LENGTH: Final = 16
MAX_PAGE: Final = 1000
DEFAULT_PAGE: Final = 100

_MANAGER_KEY: Final = web.AppKey("aiohttp_session_store.query.manager", SessionManager)
_TOKEN_KEY: Final = web.AppKey("aiohttp_session_store.query.token", bytes)

_STATES: Final = ("all", "active", "expired")


# -- the sub-application ---------------------------------------------------------------------------


class _ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def _error(status: int, message: str, kind: str) -> web.Response:
    response = web.json_response({"error": {"message": message, "type": kind}}, status=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="aiohttp_session_store"'
    return response


def _bad(message: str) -> NoReturn:
    raise _ApiError(400, message, "invalid_request_error")


class _Params:
    """The query string of one request, validated; every value leaves here typed."""

    def __init__(self, request: web.Request, allowed: tuple[str, ...]) -> None:
        query = request.query
        for name in query:
            if name not in allowed:
                # A misspelt filter must not silently return everything.
                takes = f"takes: {', '.join(allowed)}" if allowed else "takes no parameters"
                _bad(f"unknown parameter {name!r}; this endpoint {takes}")
            if len(query.getall(name)) > 1:
                _bad(f"parameter {name!r} is given more than once")
        self._query = query
        self.now = now_ms()

    def text(self, name: str) -> str | None:
        value = self._query.get(name)
        if value is not None and not value:
            _bad(f"parameter {name!r} is empty")
        return value

    def integer(self, name: str, default: int, lo: int, hi: int | None) -> int:
        raw = self._query.get(name)
        if raw is None:
            return default
        # isdecimal(), not int(): int() also takes "+5", " 5", "5_000" and other digits.
        if not (raw.isascii() and raw.isdecimal()) or len(raw) > 12:
            _bad(f"parameter {name!r} must be an integer, not {raw!r}")
        value = int(raw)
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            _bad(f"parameter {name!r} must be {bound}, not {value}")
        return value

    def boolean(self, name: str) -> bool | None:
        raw = self._query.get(name)
        if raw is None:
            return None
        if raw not in ("true", "false"):
            _bad(f"parameter {name!r} must be true or false, not {raw!r}")
        return raw == "true"

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        raw = self._query.get(name, default)
        if raw not in choices:
            _bad(f"parameter {name!r} must be one of {', '.join(choices)}, not {raw!r}")
        return raw

    def time(self, name: str) -> int | None:
        raw = self._query.get(name)
        if raw is None:
            return None
        try:
            # The server's local zone means nothing to a remote client: naive times are UTC.
            return parse_time(raw, now=self.now, tz=timezone.utc)
        except ValueError as exc:
            _bad(f"parameter {name!r}: {exc}")


def _manager(request: web.Request) -> SessionManager:
    return request.app[_MANAGER_KEY]


def _page_json(key: str, items: list[Any], total: int, limit: int, offset: int) -> web.Response:
    return web.json_response({key: items, "total": total, "limit": limit, "offset": offset})


async def _resolve(backend: Backend, kind: Literal["session", "request"], given: str) -> str:
    """An id or an id prefix, expanded (400 naming the candidates when ambiguous)."""
    try:
        return await resolve_id(backend, kind, given)
    except AmbiguousIdError as exc:
        raise _ApiError(400, str(exc), "invalid_request_error") from None


async def _search(
    p: _Params, backend: Backend, query: str, limit: int, session_id: str | None
) -> list[Any]:
    """Search hits for `?q=`; a query with no words is a 400."""
    try:
        return await backend.search(
            query, limit=limit, session_id=session_id, since=p.time("since")
        )
    except ValueError as exc:
        _bad(f"parameter 'q': {exc}")


async def _search_sessions(request: web.Request) -> web.Response:
    """`GET /sessions?q=`: the sessions of the most recent matching calls, each with its
    best match (`match`: request_id and snippet); a session whose row is gone (its records
    outlive it) comes with its id only."""
    p = _Params(request, ("q", "limit", "since"))
    limit = p.integer("limit", DEFAULT_PAGE, 1, MAX_PAGE)
    backend = _manager(request).backend
    # Several matches may share a session: read a few more calls than sessions wanted.
    hits = await _search(p, backend, p.text("q") or "", min(limit * 5, MAX_PAGE), None)
    items: list[dict[str, Any]] = []
    seen: set[str | None] = set()
    for hit in hits:
        sid = hit.exchange.request.session_id
        if sid is None or sid in seen:
            continue
        seen.add(sid)
        session = await backend.get_session(sid)
        item: dict[str, Any] = (
            {"id": sid, "expired": True} if session is None else session_json(session, now=p.now)
        )
        item["match"] = {"request_id": hit.exchange.request.request_id, "snippet": hit.snippet}
        items.append(item)
        if len(items) == limit:
            break
    # A search is not counted: `total` is null, and there is no offset to page with.
    return web.json_response({"sessions": items, "total": None, "limit": limit, "offset": 0})


async def _list_sessions(request: web.Request) -> web.Response:
    if "q" in request.query:
        return await _search_sessions(request)
    p = _Params(request, ("limit", "offset", "order", "state"))
    limit = p.integer("limit", DEFAULT_PAGE, 1, MAX_PAGE)
    offset = p.integer("offset", 0, 0, None)
    order = cast(SessionOrder, p.choice("order", SESSION_ORDERS, "created_at_desc"))
    state = cast(Literal["all", "active", "expired"], p.choice("state", _STATES, "all"))
    backend = _manager(request).backend
    sessions = await backend.list_sessions(
        SessionQuery(state=state, now=p.now, limit=limit, offset=offset, order=order)
    )
    total = await backend.count_sessions()
    if state != "all":
        active = await backend.count_sessions(active_at=p.now)
        total = active if state == "active" else total - active
    return _page_json(
        "sessions", [session_json(s, now=p.now) for s in sessions], total, limit, offset
    )


async def _known_session(request: web.Request) -> tuple[str, Session | None, int]:
    """(id, row or None, request count); 404 when there is neither a row nor a record."""
    backend = _manager(request).backend
    session_id = await _resolve(backend, "session", request.match_info["session_id"])
    session = await backend.get_session(session_id)
    count = await backend.count_requests(RequestQuery(session_id=session_id))
    if session is None and count == 0:
        raise _ApiError(404, f"no session {session_id!r}", "not_found_error")
    return session_id, session, count


async def _get_session(request: web.Request) -> web.Response:
    _Params(request, ())
    session_id, session, count = await _known_session(request)
    if session is None:
        # Its records outlive an expired, swept session; the row itself is gone.
        raise _ApiError(
            404, f"no session {session_id!r} (it has {count} records)", "not_found_error"
        )
    return web.json_response({**session_json(session, now=now_ms()), "request_count": count})


async def _session_stats(request: web.Request) -> web.Response:
    p = _Params(request, ("since", "until"))
    session_id, _, _ = await _known_session(request)
    stats = await _manager(request).backend.response_stats(
        RequestQuery(session_id=session_id, since=p.time("since"), until=p.time("until"))
    )
    return web.json_response({"session_id": session_id, **stats.to_json()})


async def _session_tree(request: web.Request) -> web.Response:
    _Params(request, ())
    session_id, _, _ = await _known_session(request)
    backend = _manager(request).backend
    nodes = await backend.list_lineage_nodes(session_id)
    exchanges = await backend.list_exchanges(RequestQuery(session_id=session_id))
    tree = tree_json(build_tree(nodes), exchanges_by_response(exchanges))
    return web.json_response({"session_id": session_id, **tree})


async def _delete_session(request: web.Request) -> web.Response:
    _Params(request, ())
    session_id = request.match_info["session_id"]
    manager = _manager(request)
    # Through the manager, not the backend: its cache must forget the session too.
    if not await manager.delete_session(session_id):
        raise _ApiError(404, f"no session {session_id!r}", "not_found_error")
    # A client that deletes and then reads must not see the row again: commit now (bounded,
    # so the admin API answers even while storage is failing).
    await manager.commit_bounded()
    return web.json_response({"id": session_id, "deleted": True})


def _request_query(
    p: _Params, *, limit: int | None = None, offset: int = 0, oldest_first: bool = False
) -> RequestQuery:
    return RequestQuery(
        session_id=p.text("session_id"),
        model=p.text("model"),
        stream=p.boolean("stream"),
        since=p.time("since"),
        until=p.time("until"),
        limit=limit,
        offset=offset,
        oldest_first=oldest_first,
    )


async def _search_requests(request: web.Request) -> web.Response:
    """`GET /requests?q=`: matching calls, most recent first, each with a `snippet`."""
    p = _Params(request, ("q", "session_id", "since", "limit"))
    limit = p.integer("limit", DEFAULT_PAGE, 1, MAX_PAGE)
    backend = _manager(request).backend
    session_id = p.text("session_id")
    if session_id is not None:
        session_id = await _resolve(backend, "session", session_id)
    hits = await _search(p, backend, p.text("q") or "", limit, session_id)
    items = [hit_json(h) for h in hits]
    return web.json_response({"requests": items, "total": None, "limit": limit, "offset": 0})


async def _list_requests(request: web.Request) -> web.Response:
    if "q" in request.query:
        return await _search_requests(request)
    p = _Params(
        request, ("session_id", "model", "stream", "since", "until", "limit", "offset", "order")
    )
    limit = p.integer("limit", DEFAULT_PAGE, 1, MAX_PAGE)
    offset = p.integer("offset", 0, 0, None)
    oldest_first = p.choice("order", ("newest", "oldest"), "newest") == "oldest"
    query = _request_query(p, limit=limit, offset=offset, oldest_first=oldest_first)
    backend = _manager(request).backend
    if query.session_id is not None:
        query = replace(query, session_id=await _resolve(backend, "session", query.session_id))
    exchanges = await backend.list_exchanges(query)
    # count_requests ignores limit, offset and order: the total of every page.
    total = await backend.count_requests(query)
    return _page_json("requests", [exchange_json(e) for e in exchanges], total, limit, offset)


async def _get_request(request: web.Request) -> web.Response:
    _Params(request, ())
    backend = _manager(request).backend
    request_id = await _resolve(backend, "request", request.match_info["request_id"])
    exchange = await backend.get_exchange(request_id)
    if exchange is None:
        raise _ApiError(404, f"no request {request_id!r}", "not_found_error")
    return web.json_response(exchange_json(exchange, bodies=True))


async def _response_stats(request: web.Request) -> web.Response:
    p = _Params(request, ("session_id", "model", "stream", "since", "until"))
    backend = _manager(request).backend
    query = _request_query(p)
    if query.session_id is not None:
        query = replace(query, session_id=await _resolve(backend, "session", query.session_id))
    return web.json_response((await backend.response_stats(query)).to_json())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer authentication first, then every failure as a JSON error body."""
    if viewer.is_viewer_public(request):
        return await viewer.serve_page(request, handler)
    expected = request.app[_TOKEN_KEY]
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    # compare_digest: the time taken must not reveal how much of a guess was right.
    bearer = scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), expected
    )
    # The viewer's cookie reads, and only reads: it never reaches an admin route.
    if not bearer and not (request.method in ("GET", "HEAD") and viewer.cookie_valid(request)):
        if viewer.is_viewer_page(request):
            response = viewer.to_login(request)
            viewer.secure_headers(response)
            return response
        return _error(401, "a valid bearer token is required", "authentication_error")
    if viewer.is_viewer_page(request):
        return await viewer.serve_page(request, handler)
    try:
        return await handler(request)
    except _ApiError as exc:
        return _error(exc.status, exc.message, exc.kind)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # Routing's own 404 and 405, in the same JSON shape as every other error.
        response = _error(exc.status, exc.reason, "invalid_request_error")
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except StoreError:
        log.exception("query API: the store failed")
        return _error(503, "the session store is unavailable; retry shortly", "server_error")


def create_query_app(
    manager: SessionManager, *, token: str, admin: bool = False
) -> web.Application:
    """The query API over `manager`, for `app.add_subapp(prefix, ...)`.

    Every JSON route needs ``Authorization: Bearer <token>`` (or, for GET, the cookie the
    viewer's sign-in form gives a browser: see viewer.py); `token` must be at least 16
    characters (generate one with ``python -c "import secrets; print(secrets.token_urlsafe())"``).
    The routes only read, unless `admin` is true: then the admin routes that change the
    store (``DELETE /sessions/{id}``) are served too. Without it they answer 405.
    """
    if not isinstance(token, str) or len(token.strip()) < MIN_TOKEN_LENGTH:
        raise ValueError(f"the query API token must be at least {MIN_TOKEN_LENGTH} characters")
    if token != token.strip():
        raise ValueError("the query API token must not start or end with whitespace")
    app = web.Application(middlewares=[_guard])
    app[_MANAGER_KEY] = manager
    app[_TOKEN_KEY] = token.encode("utf-8")
    app.router.add_get("/sessions", _list_sessions)
    app.router.add_get("/sessions/{session_id}", _get_session)
    if admin:
        app.router.add_delete("/sessions/{session_id}", _delete_session)
    app.router.add_get("/sessions/{session_id}/stats", _session_stats)
    app.router.add_get("/sessions/{session_id}/tree", _session_tree)
    app.router.add_get("/requests", _list_requests)
    app.router.add_get("/requests/{request_id}", _get_request)
    app.router.add_get("/responses/stats", _response_stats)
    viewer.add_viewer(app, manager, app[_TOKEN_KEY])
    return app
