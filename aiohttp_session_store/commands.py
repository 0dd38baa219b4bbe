"""The CLI's reading commands (sessions, show, requests, stats) and what all commands share.

Each command takes the parsed arguments and an output stream and returns an exit code;
cli.py builds the parser and reports failures.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import IO, Any, Final, Literal, cast

from .backends import backend_from_url
from .backends.base import Backend
from .models import Exchange, RequestQuery, Session, SessionOrder, SessionQuery, now_ms
from .prefixes import resolve_id
from .stats import StatsReport, Summary
from .terminal import clean, opt, relative, short, table, terminal_width, tokens, write_json
from .timeparse import format_duration_ms, format_local
from .tree import ConversationTree, build_tree, exchanges_by_response, tree_json
from .views import exchange_json, last_user_text, reply_text, session_json, system_text

__all__ = (
    "PROG",
    "CliError",
    "cmd_requests",
    "cmd_sessions",
    "cmd_show",
    "cmd_stats",
    "reader",
    "request_query",
    "session_arg",
)

PROG: Final = "aiohttp-session-store"

_EXPORT_PAGE: Final = 500
_MESSAGE_WIDTH: Final = 40


class CliError(Exception):
    """A failure to report as one line (exit code 1)."""


# -- opening the store -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def reader(db: str) -> AsyncIterator[Backend]:
    """The store opened read-only: it refuses writes, and never creates or migrates."""
    backend = backend_from_url(db, read_only=True)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


async def session_arg(backend: Backend, args: argparse.Namespace) -> None:
    """Expand `--session ID_PREFIX` in place (AmbiguousIdError names the candidates)."""
    if getattr(args, "session", None):
        args.session = await resolve_id(backend, "session", args.session)


def request_query(args: argparse.Namespace, **extra: Any) -> RequestQuery:
    return RequestQuery(
        session_id=getattr(args, "session", None),
        model=getattr(args, "model", None),
        since=getattr(args, "since", None),
        until=getattr(args, "until", None),
        **extra,
    )


# -- commands --------------------------------------------------------------------------------------


async def cmd_sessions(args: argparse.Namespace, out: IO[str]) -> int:
    now = now_ms()
    state: Literal["all", "active", "expired"] = (
        "active" if args.active else "expired" if args.expired else "all"
    )
    query = SessionQuery(
        state=state, now=now, limit=args.limit or None, order=cast(SessionOrder, args.order)
    )
    async with reader(args.db) as backend:
        sessions = await backend.list_sessions(query)
    if args.json:
        write_json(out, [session_json(s, now=now) for s in sessions])
        return 0
    if not sessions:
        out.write("no sessions\n")
        return 0
    rows = [
        [
            s.id,
            short(s.chat_id, 16),
            short(s.parent_id, 16),
            str(s.message_count),
            format_local(s.created_at),
            format_local(s.last_accessed),
            relative(s.expires_at, now),
            short(s.first_user_message, _MESSAGE_WIDTH),
        ]
        for s in sessions
    ]
    headers = ["ID", "CHAT", "PARENT", "MSGS", "CREATED", "LAST USED", "EXPIRES", "FIRST MESSAGE"]
    lines = table(
        headers, rows, right=frozenset({3}), width=terminal_width(out), fit=frozenset({1, 2, 7})
    )
    out.write("\n".join(lines) + "\n")
    return 0


def _show_session(session: Session, now: int) -> list[str]:
    fields = [
        ("session", session.id),
        ("chat", opt(session.chat_id)),
        ("parent", opt(session.parent_id)),
        ("messages", str(session.message_count)),
        ("created", format_local(session.created_at)),
        ("last used", format_local(session.last_accessed)),
        (
            "expires",
            f"{format_local(session.expires_at)} ({relative(session.expires_at, now)})",
        ),
        ("first", short(session.first_user_message, 200)),
    ]
    return [f"{name:<10} {clean(value)}" for name, value in fields]


def _indent(label: str, text: str | None) -> list[str]:
    if text is None:
        return [f"    {label:<6} -"]
    lines = clean(text, keep_newlines=True).expandtabs(4).split("\n")
    head = f"    {label:<6} "
    return [head + lines[0]] + [" " * len(head) + line for line in lines[1:]]


def _show_exchange(n: int, exchange: Exchange, previous_system: str | None) -> list[str]:
    req, resp = exchange.request, exchange.response
    head = [
        f"#{n}",
        format_local(req.timestamp),
        short(req.model, 40),
        "stream" if req.stream else "json",
    ]
    if resp is None:
        head.append("(no response recorded)")
    else:
        head += [
            f"{opt(resp.status_code)} {resp.outcome}",
            "tokens " + tokens(resp.prompt_tokens, resp.completion_tokens, resp.total_tokens),
            f"{format_duration_ms(resp.duration_ms)}"
            f" (first byte {format_duration_ms(resp.first_byte_ms)})",
        ]
    lines = ["  ".join(head)]
    # Clients resend the system prompt every turn: shown when it first appears or changes.
    system = system_text(req.openai_request)
    if system is not None and system != previous_system:
        lines += _indent("system:", system)
    lines += _indent("user:", last_user_text(req.openai_request))
    if resp is not None:
        lines += _indent("reply:", reply_text(resp.openai_response))
        if resp.error is not None:
            lines += _indent("error:", resp.error)
    return lines


def _show_tree(tree: ConversationTree, exchanges: list[Exchange]) -> list[str]:
    """The lineage as indented branches; `*` marks the active path, `o` the other nodes."""
    if not tree.nodes:
        return ["tree       - (no lineage recorded)"]
    numbers = {e.response.response_id: n for n, e in enumerate(exchanges, 1) if e.response}
    lines = [
        f"tree       {len(tree.nodes)} nodes, {tree.branch_points} branch point(s);"
        " * marks the active path"
    ]
    for line in tree.walk():
        node = line.node
        n = numbers.get(node.response_id or "")
        if n is None:
            label = f"node {short(node.node_id, 24)} (call not recorded)"
        else:
            exchange = exchanges[n - 1]
            resp = exchange.response
            user = short(last_user_text(exchange.request.openai_request), _MESSAGE_WIDTH)
            reply = short(None if resp is None else reply_text(resp.openai_response), 40)
            label = f"#{n} {user} -> {reply}"
        lines.append(f"  {line.lead}{'*' if line.active else 'o'} {label}")
    return lines


async def cmd_show(args: argparse.Namespace, out: IO[str]) -> int:
    now = now_ms()
    async with reader(args.db) as backend:
        args.session_id = await resolve_id(backend, "session", args.session_id)
        session = await backend.get_session(args.session_id)
        exchanges = await backend.list_exchanges(
            RequestQuery(session_id=args.session_id, oldest_first=True)
        )
        nodes = await backend.list_lineage_nodes(args.session_id)
    if session is None and not exchanges:
        raise CliError(f"no session {args.session_id!r}")
    tree = build_tree(nodes)
    # Completed calls, the turn count of the sessions_view: right also for a proxy that
    # never calls update_parent_id (whose message_count stays 0).
    turns = sum(1 for e in exchanges if e.response and e.response.outcome == "completed")
    if args.json:
        write_json(
            out,
            {
                "session": None if session is None else session_json(session, now=now),
                "turns": turns,
                "requests": [exchange_json(e) for e in exchanges],
                "tree": tree_json(tree, exchanges_by_response(exchanges)),
            },
        )
        return 0
    if session is None:
        lines = [f"session    {clean(args.session_id)} (row gone: expired or deleted)"]
    else:
        lines = _show_session(session, now)
    lines += _show_tree(tree, exchanges)
    lines.insert(4 if session is not None else 1, f"{'turns':<10} {turns} completed calls")
    previous_system = None
    for n, exchange in enumerate(exchanges, 1):
        lines.append("")
        lines += _show_exchange(n, exchange, previous_system)
        previous_system = system_text(exchange.request.openai_request)
    out.write("\n".join(lines) + "\n")
    return 0


async def cmd_requests(args: argparse.Namespace, out: IO[str]) -> int:
    async with reader(args.db) as backend:
        await session_arg(backend, args)
        exchanges = await backend.list_exchanges(request_query(args, limit=args.limit or None))
    if args.json:
        write_json(out, [exchange_json(e) for e in exchanges])
        return 0
    if not exchanges:
        out.write("no requests\n")
        return 0
    rows = []
    for e in exchanges:
        req, resp = e.request, e.response
        rows.append(
            [
                format_local(req.timestamp),
                opt(req.session_id),
                short(req.model, 24),
                "yes" if req.stream else "no",
                opt(resp.status_code) if resp else "-",
                resp.outcome if resp else "(pending)",
                opt(resp.total_tokens) if resp else "-",
                format_duration_ms(resp.duration_ms) if resp else "-",
                format_duration_ms(resp.first_byte_ms) if resp else "-",
                short(last_user_text(req.openai_request), _MESSAGE_WIDTH),
            ]
        )
    headers = [
        "TIME",
        "SESSION",
        "MODEL",
        "STREAM",
        "STATUS",
        "OUTCOME",
        "TOKENS",
        "DURATION",
        "FIRST BYTE",
        "USER MESSAGE",
    ]
    lines = table(
        headers,
        rows,
        right=frozenset({4, 6, 7, 8}),
        width=terminal_width(out),
        fit=frozenset({2, 9}),
    )
    out.write("\n".join(lines) + "\n")
    return 0


def _stats_row(name: str, s: Summary) -> list[str]:
    return [
        name,
        str(s.requests),
        *(str(s.outcomes.get(k, 0)) for k in ("completed", "client_disconnected")),
        *(str(s.outcomes.get(k, 0)) for k in ("upstream_error", "handler_error")),
        str(s.prompt_tokens),
        str(s.completion_tokens),
        str(s.total_tokens),
        str(s.without_usage),
        format_duration_ms(s.duration_ms.p50),
        format_duration_ms(s.duration_ms.p95),
        format_duration_ms(s.first_byte_ms.p50),
        format_duration_ms(s.first_byte_ms.p95),
    ]


def _stats_lines(stats: StatsReport, width: int | None) -> list[str]:
    headers = [
        "MODEL",
        "CALLS",
        "OK",
        "DISCONNECTED",
        "UPSTREAM ERR",
        "HANDLER ERR",
        "PROMPT TOK",
        "COMPL TOK",
        "TOTAL TOK",
        "NO USAGE",
        "P50",
        "P95",
        "FIRST BYTE P50",
        "P95",
    ]
    rows = [_stats_row(short(m, 32) if m else "(none)", s) for m, s in stats.by_model]
    rows.append(_stats_row("all", stats.overall))
    return table(
        headers, rows, right=frozenset(range(1, len(headers))), width=width, fit=frozenset({0})
    )


async def cmd_stats(args: argparse.Namespace, out: IO[str]) -> int:
    async with reader(args.db) as backend:
        await session_arg(backend, args)
        # Aggregated in the database: a million responses never cross into Python.
        stats = await backend.response_stats(request_query(args))
    if args.json:
        write_json(out, stats.to_json())
    elif not stats.overall.requests:
        out.write("no responses recorded\n")
    else:
        out.write("\n".join(_stats_lines(stats, terminal_width(out))) + "\n")
    return 0
