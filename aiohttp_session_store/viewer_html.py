"""The viewer's pages as HTML: the frame, the login form, the sessions list, an error page.

Pure (values in, markup out); every value passes `esc`. The session page itself is
viewer_thread.py. Links are absolute paths computed by viewer.py from the router, so the
pages work under whatever prefix the query app is mounted at.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, urlencode

from .models import OUTCOMES, Session
from .viewer_thread import esc, human_time, short_text

__all__ = ("Links", "SessionRow", "error_page", "login_page", "page", "sessions_body")


@dataclass(frozen=True, slots=True)
class Links:
    index: str
    login: str
    logout: str
    static: str
    #: The JSON API's request list, which the search box calls with ``?q=``.
    api_requests: str
    #: A session's page is this plus the quoted id.
    session: str

    def session_url(self, session_id: str) -> str:
        return self.session + quote(session_id, safe="")


@dataclass(slots=True)
class SessionRow:
    """A line of the sessions list: the session (None once swept) and its calls' facts."""

    session_id: str
    session: Session | None
    calls: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)
    total_tokens: int = 0


_FILTERS: Final = ("model", "outcome", "since", "until")


def page(title: str, body: str, links: Links, *, signed_in: bool = True) -> str:
    """A whole document: no inline script or style, so the CSP can forbid both."""
    nav = ""
    if signed_in:
        nav = (
            f'<nav><a href="{esc(links.index)}">Sessions</a>'
            f'<form method="post" action="{esc(links.logout)}" class="logout">'
            '<button type="submit">Log out</button></form></nav>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="no-referrer">'
        f"<title>{esc(title)} · session store</title>"
        f'<link rel="stylesheet" href="{esc(links.static)}/viewer.css">'
        f'<script src="{esc(links.static)}/viewer.js" defer></script>'
        f"</head><body><header>{nav}</header><main>{body}</main></body></html>"
    )


def login_page(links: Links, *, failed: bool) -> str:
    """The form that POSTs the token (never a GET: the token must not reach a URL or a log)."""
    error = '<p class="error" role="alert">That token is not right.</p>' if failed else ""
    body = (
        "<h1>Session store viewer</h1>"
        f"{error}"
        f'<form method="post" action="{esc(links.login)}" class="login">'
        '<label for="token">Query API token</label> '
        '<input type="password" id="token" name="token" autocomplete="current-password" required>'
        ' <button type="submit">Sign in</button></form>'
    )
    return page("Sign in", body, links, signed_in=False)


def error_page(links: Links, title: str, message: str) -> str:
    return page(title, f'<h1>{esc(title)}</h1><p class="error">{esc(message)}</p>', links)


def _filters(links: Links, values: Mapping[str, str]) -> str:
    options = ['<option value="">any</option>'] + [
        f'<option value="{o}"{" selected" if values.get("outcome") == o else ""}>'
        f"{o.replace('_', ' ')}</option>"
        for o in OUTCOMES
    ]

    def text(name: str, hint: str) -> str:
        return (
            f'<label>{name} <input type="text" name="{name}" value="{esc(values.get(name, ""))}"'
            f' placeholder="{esc(hint)}"></label> '
        )

    return (
        f'<form method="get" action="{esc(links.index)}" class="filters" id="filters">'
        f"{text('model', 'gpt-4o')}"
        f'<label>outcome <select name="outcome">{"".join(options)}</select></label> '
        f"{text('since', '2h, 7d or 2026-11-24')}{text('until', 'now')}"
        '<button type="submit">Filter</button></form>'
    )


def _search(links: Links) -> str:
    # Without script the form still works: it opens the API's JSON answer.
    return (
        f'<form method="get" action="{esc(links.api_requests)}" class="search" id="search"'
        f' data-api="{esc(links.api_requests)}" data-sessions="{esc(links.session)}">'
        '<label>Search recorded content <input type="search" name="q" required'
        ' placeholder="words from a message, a reply or an error"></label>'
        ' <button type="submit">Search</button></form>'
        '<div id="search-results" aria-live="polite"></div>'
    )


def _row(links: Links, row: SessionRow, now: int) -> str:
    s = row.session
    if s is None:
        state, first, when = "row gone", "-", "-"
    else:
        state = "expired" if s.is_expired(now) else "active"
        first, when = short_text(s.first_user_message, 80), human_time(s.last_accessed)
    outcomes = ", ".join(f"{n} {o.replace('_', ' ')}" for o, n in sorted(row.outcomes.items()))
    models = ", ".join(sorted(row.models))
    cells = [
        f'<a class="session-link" href="{esc(links.session_url(row.session_id))}"'
        f' title="{esc(row.session_id)}">{esc(row.session_id[:12])}</a>',
        esc(first),
        str(row.calls),
        esc(outcomes or "-"),
        esc(models or "-"),
        str(row.total_tokens),
        when,
        esc(state),
    ]
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def sessions_body(
    links: Links,
    rows: Sequence[SessionRow],
    *,
    values: Mapping[str, str],
    total: int,
    offset: int,
    limit: int,
    now: int,
    note: str | None = None,
) -> str:
    """The sessions list: filters, search box, one table page, previous/next links."""
    head = ["Session", "First message", "Calls", "Outcomes", "Models", "Tokens", "Last used", ""]
    table = (
        '<table class="sessions"><thead><tr>'
        + "".join(f"<th>{h}</th>" for h in head)
        + "</tr></thead><tbody>"
        + "".join(_row(links, r, now) for r in rows)
        + "</tbody></table>"
        if rows
        else '<p class="note">No sessions match.</p>'
    )
    kept = {k: v for k, v in values.items() if k in _FILTERS and v}
    pager = []
    if offset > 0:
        back = urlencode({**kept, "offset": max(0, offset - limit)})
        pager.append(f'<a href="{esc(links.index)}?{esc(back)}">← newer</a>')
    if offset + limit < total:
        on = urlencode({**kept, "offset": offset + limit})
        pager.append(f'<a href="{esc(links.index)}?{esc(on)}">older →</a>')
    shown = f"{offset + 1}–{offset + len(rows)} of {total}" if rows else f"0 of {total}"
    return "".join(
        [
            "<h1>Sessions</h1>",
            _filters(links, values),
            _search(links),
            f'<p class="note">{esc(shown)}{" · " + esc(note) if note else ""}</p>',
            table,
            f'<p class="pager">{" ".join(pager)}</p>',
        ]
    )
