"""The conversation viewer: read-only HTML pages served by the query app under ``/viewer/``.

A browser signs in by POSTing the query API token to ``/viewer/login``; it gets back a
signed, HttpOnly, SameSite=Strict cookie, so the token never appears in a URL, a log or
page script. The cookie is ``<expiry>.<HMAC>`` under a key derived from the token: nothing
is kept on the server, every instance of a proxy accepts it, and changing the token
signs every browser out. The cookie is honoured for GET only, so it cannot drive the
admin routes; the JSON API keeps taking ``Authorization: Bearer``.

Pages are rendered on the server (viewer_html.py, viewer_thread.py); the one script
(static/viewer.js) runs the search box over the JSON API. The Content-Security-Policy
allows no inline script or style and no other origin.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import timezone
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from aiohttp import web

from .errors import StoreError
from .manager import SessionManager
from .models import OUTCOMES, RequestQuery, SessionQuery, now_ms
from .timeparse import parse_time
from .viewer_html import Links, SessionRow, error_page, login_page, page, sessions_body
from .viewer_thread import esc, session_body

__all__ = (
    "COOKIE_NAME",
    "COOKIE_TTL_MS",
    "MAX_THREAD_CALLS",
    "PAGE_SIZE",
    "add_viewer",
    "cookie_valid",
    "is_viewer_page",
    "is_viewer_public",
    "secure_headers",
    "serve_page",
    "to_login",
)

log: Final = logging.getLogger("aiohttp_session_store.viewer")

COOKIE_NAME: Final = "aiohttp_session_store_viewer"
COOKIE_TTL_MS: Final = 12 * 3600 * 1000
PAGE_SIZE: Final = 50
#: Calls shown on one session page (the thread is computed over them in memory).
MAX_THREAD_CALLS: Final = 200

STATIC_DIR: Final = Path(__file__).with_name("static")
_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self';"
    " img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_PUBLIC: Final = frozenset(
    {"viewer-login", "viewer-login-post", "viewer-logout", "viewer-root", "viewer-static"}
)
_PAGES: Final = frozenset({"viewer-index", "viewer-session"})

_KEY: Final = web.AppKey("aiohttp_session_store.viewer.key", bytes)
_MANAGER: Final = web.AppKey("aiohttp_session_store.viewer.manager", SessionManager)


def _route_name(request: web.Request) -> str | None:
    return getattr(request.match_info.route, "name", None)


def is_viewer_public(request: web.Request) -> bool:
    """The login form, logout and the static files: served without credentials."""
    return _route_name(request) in _PUBLIC


def is_viewer_page(request: web.Request) -> bool:
    return _route_name(request) in _PAGES


def _links(request: web.Request) -> Links:
    router = request.app.router
    index = str(router["viewer-index"].url_for())
    return Links(
        index=index,
        login=str(router["viewer-login"].url_for()),
        logout=str(router["viewer-logout"].url_for()),
        static=index + "static",
        api_requests=index[: -len("viewer/")] + "requests",
        session=index + "sessions/",
    )


def _cookie_path(links: Links) -> str:
    # The app's root, so the JSON API (the search box's requests) gets the cookie too.
    return links.index[: -len("viewer/")] or "/"


def _sign(key: bytes, expires: int) -> str:
    return hmac.new(key, str(expires).encode(), hashlib.sha256).hexdigest()


def cookie_valid(request: web.Request) -> bool:
    """True when the request carries an unexpired cookie signed by this app's token."""
    if _KEY not in request.app:
        return False
    raw = request.cookies.get(COOKIE_NAME, "")
    expires, _, signature = raw.partition(".")
    if not (expires.isascii() and expires.isdecimal()) or len(expires) > 15:
        return False
    if not hmac.compare_digest(signature.encode(), _sign(request.app[_KEY], int(expires)).encode()):
        return False
    return int(expires) > now_ms()


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def to_login(request: web.Request) -> web.StreamResponse:
    """Where a page sends a browser that is not signed in."""
    return _see_other(_links(request).login)


def secure_headers(response: web.StreamResponse) -> None:
    """What every viewer response carries: no caching, no framing, no foreign code."""
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers.setdefault("Cache-Control", "no-store")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve_page(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run a viewer route: its security headers, and a storage failure as an HTML page."""
    try:
        response = await handler(request)
    except StoreError:
        log.exception("viewer: the store failed")
        response = _html(
            error_page(_links(request), "Unavailable", "the session store is unavailable; retry"),
            503,
        )
    secure_headers(response)
    return response


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


# -- signing in ------------------------------------------------------------------------------------


async def _login_form(request: web.Request) -> web.Response:
    return _html(login_page(_links(request), failed=False))


def _same_origin(request: web.Request) -> bool:
    # A form posted from another site must not sign this browser in (login CSRF).
    origin = request.headers.get("Origin")
    return origin is None or origin == "null" or urlsplit(origin).netloc == request.host


async def _login(request: web.Request) -> web.StreamResponse:
    links = _links(request)
    if not _same_origin(request):
        return _html(error_page(links, "Refused", "a sign-in from another site"), 403)
    form = await request.post()
    given = form.get("token")
    expected: bytes = request.app[_TOKEN_BYTES]
    if not isinstance(given, str) or not hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), expected
    ):
        return _html(login_page(links, failed=True), 401)
    expires = now_ms() + COOKIE_TTL_MS
    response = _see_other(links.index)
    response.set_cookie(
        COOKIE_NAME,
        f"{expires}.{_sign(request.app[_KEY], expires)}",
        max_age=COOKIE_TTL_MS // 1000,
        path=_cookie_path(links),
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    return response


async def _logout(request: web.Request) -> web.StreamResponse:
    links = _links(request)
    response = _see_other(links.login)
    response.del_cookie(COOKIE_NAME, path=_cookie_path(links))
    return response


# -- pages -----------------------------------------------------------------------------------------


class _BadFilter(ValueError):
    pass


def _filter_values(query: Mapping[str, str], now: int) -> tuple[dict[str, str], RequestQuery, int]:
    values = {k: query.get(k, "").strip() for k in ("model", "outcome", "since", "until")}
    if values["outcome"] and values["outcome"] not in OUTCOMES:
        raise _BadFilter(f"outcome must be one of {', '.join(OUTCOMES)}")
    times: dict[str, int | None] = {}
    for name in ("since", "until"):
        try:
            raw = values[name]
            times[name] = parse_time(raw, now=now, tz=timezone.utc) if raw else None
        except ValueError as exc:
            raise _BadFilter(f"{name}: {exc}") from None
    raw_offset = query.get("offset", "0")
    if not (raw_offset.isascii() and raw_offset.isdecimal()) or len(raw_offset) > 9:
        raise _BadFilter(f"offset must be a whole number, not {raw_offset!r}")
    rq = RequestQuery(model=values["model"] or None, since=times["since"], until=times["until"])
    return values, rq, int(raw_offset)


async def _index(request: web.Request) -> web.Response:
    links, now = _links(request), now_ms()
    backend = request.app[_MANAGER].backend
    try:
        values, rq, offset = _filter_values(request.query, now)
    except _BadFilter as exc:
        return _html(error_page(links, "Bad filter", str(exc)), 400)
    note = None
    if any(values.values()):
        # Sessions with at least one matching call, the most recently active first.
        rows: dict[str, SessionRow] = {}
        loose = 0
        for fact in await backend.response_facts(rq):
            if values["outcome"] and fact.outcome != values["outcome"]:
                continue
            if fact.session_id is None:
                loose += 1
                continue
            row = rows.pop(fact.session_id, None) or SessionRow(fact.session_id, None)
            rows[fact.session_id] = row  # re-inserted: dict order is last activity
            _count(row, fact.outcome, fact.model, fact.total_tokens)
        ordered = list(reversed(rows.values()))
        total, page_rows = len(ordered), ordered[offset : offset + PAGE_SIZE]
        for row in page_rows:
            row.session = await backend.get_session(row.session_id)
        if loose:
            note = f"{loose} matching call(s) had no session"
    else:
        sessions = await backend.list_sessions(
            SessionQuery(now=now, limit=PAGE_SIZE, offset=offset, order="last_accessed_desc")
        )
        total = await backend.count_sessions()
        page_rows = []
        for s in sessions:
            row = SessionRow(s.id, s)
            for fact in await backend.response_facts(RequestQuery(session_id=s.id)):
                _count(row, fact.outcome, fact.model, fact.total_tokens)
            page_rows.append(row)
    body = sessions_body(
        links,
        page_rows,
        values=values,
        total=total,
        offset=offset,
        limit=PAGE_SIZE,
        now=now,
        note=note,
    )
    return _html(page("Sessions", body, links))


def _count(row: SessionRow, outcome: str, model: str | None, total_tokens: int | None) -> None:
    row.calls += 1
    row.outcomes[outcome] += 1
    row.models[model or "(none)"] += 1
    row.total_tokens += total_tokens or 0


async def _session(request: web.Request) -> web.Response:
    links, now = _links(request), now_ms()
    session_id = request.match_info["session_id"]
    raw_from = request.query.get("from", "1")
    if not (raw_from.isascii() and raw_from.isdecimal()) or not 0 < int(raw_from) < 10**9:
        return _html(error_page(links, "Bad parameter", "from must be a call number"), 400)
    first = int(raw_from)
    backend = request.app[_MANAGER].backend
    session = await backend.get_session(session_id)
    total = await backend.count_requests(RequestQuery(session_id=session_id))
    if session is None and total == 0:
        return _html(error_page(links, "Not found", f"no session {session_id!r}"), 404)
    exchanges = await backend.list_exchanges(
        RequestQuery(
            session_id=session_id, oldest_first=True, limit=MAX_THREAD_CALLS, offset=first - 1
        )
    )
    nodes = await backend.list_lineage_nodes(session_id)
    body = session_body(session_id, session, exchanges, nodes, first=first, total=total, now=now)
    if first + len(exchanges) <= total:
        later = f"{links.session_url(session_id)}?from={first + len(exchanges)}"
        body += f'<p class="pager"><a href="{esc(later)}">later calls →</a></p>'
    return _html(page(f"Session {session_id[:12]}", body, links))


async def _to_index(request: web.Request) -> web.Response:
    return _see_other(_links(request).index)


_TOKEN_BYTES: Final = web.AppKey("aiohttp_session_store.viewer.token", bytes)


def add_viewer(app: web.Application, manager: SessionManager, token: bytes) -> None:
    """Serve the viewer from `app` (the query app) under ``/viewer/``."""
    app[_MANAGER] = manager
    app[_TOKEN_BYTES] = token
    app[_KEY] = hmac.new(token, b"aiohttp_session_store viewer cookie v1", hashlib.sha256).digest()
    app.router.add_get("/viewer/", _index, name="viewer-index")
    app.router.add_get("/viewer", _to_index, name="viewer-root")
    app.router.add_get("/viewer/login", _login_form, name="viewer-login")
    app.router.add_post("/viewer/login", _login, name="viewer-login-post")
    app.router.add_post("/viewer/logout", _logout, name="viewer-logout")
    app.router.add_get("/viewer/sessions/{session_id}", _session, name="viewer-session")
    app.router.add_static("/viewer/static", STATIC_DIR, name="viewer-static")
