"""The command line: inspect and operate a session store (`python -m aiohttp_session_store`).

Reading commands open the store read-only (SQLite: `mode=ro`; PostgreSQL: read-only
transactions), so they never change it and can run while a proxy is writing. Every failure
is one line on stderr and a non-zero exit code: 2 for a bad command line, 1 for the rest.
The `--json` formats are documented in docs/cli.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from pathlib import Path
from typing import IO, Any, Final, Literal, NoReturn, cast

from . import __version__
from .backends import backend_from_url
from .backends.base import Backend
from .config import StoreConfig
from .errors import DatabaseNotFoundError, SchemaVersionError, StoreError
from .manager import SessionManager
from .migrations import MIGRATIONS, latest_version
from .models import (
    SESSION_ORDERS,
    Exchange,
    RequestQuery,
    Session,
    SessionOrder,
    SessionQuery,
    now_ms,
)
from .query import exchange_json, last_user_text, reply_text, session_json
from .stats import StatsReport, Summary, report
from .timeparse import format_duration_ms, format_local, parse_duration, parse_time

__all__ = ("DB_ENV", "DEFAULT_DB", "PROG", "build_parser", "main")

PROG: Final = "aiohttp-session-store"
#: The store used when `--db` is not given (a DSN with a password stays out of `ps`).
DB_ENV: Final = "AIOHTTP_SESSION_STORE_DB"
DEFAULT_DB: Final = "data/sessions.db"

_EXPORT_PAGE: Final = 500
_MESSAGE_WIDTH: Final = 40

Command = Callable[[argparse.Namespace, IO[str]], Coroutine[Any, Any, int]]


class CliError(Exception):
    """A failure to report as one line (exit code 1)."""


class _UsageError(Exception):
    """A bad command line (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the whole usage block, then exit; one line is the contract.
        raise _UsageError(message)


# -- argument types --------------------------------------------------------------------------------


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _time_arg(text: str) -> int:
    try:
        return parse_time(text, now=now_ms())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit_arg(text: str) -> int:
    if not (text.isascii() and text.isdecimal()) or len(text) > 12:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: a whole number, 0 for all")
    return int(text)


def _text_arg(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# -- human output ----------------------------------------------------------------------------------


_BIDI_CONTROLS: Final = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def _char_table(*, keep_newlines: bool) -> dict[int, str]:
    """What `str.translate` makes of characters unsafe on a terminal.

    Records hold client text: an escape sequence must not reach the operator's terminal
    (C0 controls become their visible "control pictures", ␛ for ESC), and bidirectional
    overrides must not make a line read differently than it is.
    """
    table = {code: chr(0x2400 + code) for code in range(0x20)}
    table[0x7F] = "\u2421"
    table.update({code: "\ufffd" for code in range(0x80, 0xA0)})
    table.update({ord(ch): "\ufffd" for ch in _BIDI_CONTROLS})
    for ch in "\t\n\r\v\f\u2028\u2029":
        table[ord(ch)] = " "
    if keep_newlines:
        table.update({ord("\n"): "\n", ord("\t"): "\t", ord("\r"): "", 0x2028: "\n", 0x2029: "\n"})
    return table


_ONE_LINE: Final = _char_table(keep_newlines=False)
_MULTI_LINE: Final = _char_table(keep_newlines=True)


def _clean(text: str, *, keep_newlines: bool = False) -> str:
    if keep_newlines:
        return text.translate(_MULTI_LINE)
    return " ".join(text.translate(_ONE_LINE).split())


def _short(text: str | None, width: int) -> str:
    if text is None:
        return "-"
    line = _clean(text)
    return line if len(line) <= width else line[: width - 1] + "…"


def _table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()
) -> list[str]:
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]
    lines = []
    for row in (headers, *rows):
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _relative(ms: int, now: int) -> str:
    delta = ms - now
    if delta > 0:
        return "in " + format_duration_ms(delta)
    return "expired " + format_duration_ms(-delta) + " ago"


def _opt(value: object) -> str:
    return "-" if value is None else str(value)


def _tokens(prompt: int | None, completion: int | None, total: int | None) -> str:
    if prompt is None and completion is None and total is None:
        return "-"
    return f"{_opt(prompt)}/{_opt(completion)}/{_opt(total)}"


def _write_json(out: IO[str], value: Any) -> None:
    out.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


# -- opening the store -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _reader(db: str) -> AsyncIterator[Backend]:
    """The store opened read-only: it refuses writes, and never creates or migrates."""
    backend = backend_from_url(db, read_only=True)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


def _request_query(args: argparse.Namespace, **extra: Any) -> RequestQuery:
    return RequestQuery(
        session_id=getattr(args, "session", None),
        model=getattr(args, "model", None),
        since=getattr(args, "since", None),
        until=getattr(args, "until", None),
        **extra,
    )


# -- commands --------------------------------------------------------------------------------------


async def _cmd_sessions(args: argparse.Namespace, out: IO[str]) -> int:
    now = now_ms()
    state: Literal["all", "active", "expired"] = (
        "active" if args.active else "expired" if args.expired else "all"
    )
    query = SessionQuery(
        state=state, now=now, limit=args.limit or None, order=cast(SessionOrder, args.order)
    )
    async with _reader(args.db) as backend:
        sessions = await backend.list_sessions(query)
    if args.json:
        _write_json(out, [session_json(s, now=now) for s in sessions])
        return 0
    if not sessions:
        out.write("no sessions\n")
        return 0
    rows = [
        [
            s.id,
            _short(s.chat_id, 16),
            _short(s.parent_id, 16),
            str(s.message_count),
            format_local(s.created_at),
            format_local(s.last_accessed),
            _relative(s.expires_at, now),
            _short(s.first_user_message, _MESSAGE_WIDTH),
        ]
        for s in sessions
    ]
    headers = ["ID", "CHAT", "PARENT", "MSGS", "CREATED", "LAST USED", "EXPIRES", "FIRST MESSAGE"]
    out.write("\n".join(_table(headers, rows, right=frozenset({3}))) + "\n")
    return 0


def _show_session(session: Session, now: int) -> list[str]:
    fields = [
        ("session", session.id),
        ("chat", _opt(session.chat_id)),
        ("parent", _opt(session.parent_id)),
        ("messages", str(session.message_count)),
        ("created", format_local(session.created_at)),
        ("last used", format_local(session.last_accessed)),
        (
            "expires",
            f"{format_local(session.expires_at)} ({_relative(session.expires_at, now)})",
        ),
        ("first", _short(session.first_user_message, 200)),
    ]
    return [f"{name:<10} {_clean(value)}" for name, value in fields]


def _indent(label: str, text: str | None) -> list[str]:
    if text is None:
        return [f"    {label:<6} -"]
    lines = _clean(text, keep_newlines=True).expandtabs(4).split("\n")
    return [f"    {label:<6} {lines[0]}"] + [f"           {line}" for line in lines[1:]]


def _show_exchange(n: int, exchange: Exchange) -> list[str]:
    req, resp = exchange.request, exchange.response
    head = [
        f"#{n}",
        format_local(req.timestamp),
        _short(req.model, 40),
        "stream" if req.stream else "json",
    ]
    if resp is None:
        head.append("(no response recorded)")
    else:
        head += [
            f"{_opt(resp.status_code)} {resp.outcome}",
            "tokens " + _tokens(resp.prompt_tokens, resp.completion_tokens, resp.total_tokens),
            f"{format_duration_ms(resp.duration_ms)}"
            f" (first byte {format_duration_ms(resp.first_byte_ms)})",
        ]
    lines = ["  ".join(head)]
    lines += _indent("user:", last_user_text(req.openai_request))
    if resp is not None:
        lines += _indent("reply:", reply_text(resp.openai_response))
        if resp.error is not None:
            lines += _indent("error:", resp.error)
    return lines


async def _cmd_show(args: argparse.Namespace, out: IO[str]) -> int:
    now = now_ms()
    async with _reader(args.db) as backend:
        session = await backend.get_session(args.session_id)
        exchanges = await backend.list_exchanges(
            RequestQuery(session_id=args.session_id, oldest_first=True)
        )
    if session is None and not exchanges:
        raise CliError(f"no session {args.session_id!r}")
    if args.json:
        _write_json(
            out,
            {
                "session": None if session is None else session_json(session, now=now),
                "requests": [exchange_json(e) for e in exchanges],
            },
        )
        return 0
    if session is None:
        lines = [f"session    {_clean(args.session_id)} (row gone: expired or deleted)"]
    else:
        lines = _show_session(session, now)
    for n, exchange in enumerate(exchanges, 1):
        lines.append("")
        lines += _show_exchange(n, exchange)
    out.write("\n".join(lines) + "\n")
    return 0


async def _cmd_requests(args: argparse.Namespace, out: IO[str]) -> int:
    async with _reader(args.db) as backend:
        exchanges = await backend.list_exchanges(_request_query(args, limit=args.limit or None))
    if args.json:
        _write_json(out, [exchange_json(e) for e in exchanges])
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
                _opt(req.session_id),
                _short(req.model, 24),
                "yes" if req.stream else "no",
                _opt(resp.status_code) if resp else "-",
                resp.outcome if resp else "(pending)",
                _opt(resp.total_tokens) if resp else "-",
                format_duration_ms(resp.duration_ms) if resp else "-",
                format_duration_ms(resp.first_byte_ms) if resp else "-",
                _short(last_user_text(req.openai_request), _MESSAGE_WIDTH),
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
    out.write("\n".join(_table(headers, rows, right=frozenset({4, 6, 7, 8}))) + "\n")
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
        format_duration_ms(s.duration_ms.p50),
        format_duration_ms(s.duration_ms.p95),
        format_duration_ms(s.first_byte_ms.p50),
        format_duration_ms(s.first_byte_ms.p95),
    ]


def _stats_lines(stats: StatsReport) -> list[str]:
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
        "P50",
        "P95",
        "FIRST BYTE P50",
        "P95",
    ]
    rows = [_stats_row(_short(m, 32) if m else "(none)", s) for m, s in stats.by_model]
    rows.append(_stats_row("all", stats.overall))
    return _table(headers, rows, right=frozenset(range(1, len(headers))))


async def _cmd_stats(args: argparse.Namespace, out: IO[str]) -> int:
    async with _reader(args.db) as backend:
        facts = await backend.response_facts(_request_query(args))
    stats = report(facts)
    if args.json:
        _write_json(out, stats.to_json())
    elif not stats.overall.requests:
        out.write("no responses recorded\n")
    else:
        out.write("\n".join(_stats_lines(stats)) + "\n")
    return 0


async def _export_to(backend: Backend, args: argparse.Namespace, sink: IO[str]) -> int:
    # Pages are read oldest first up to a fixed end, so records written while the export
    # runs cannot shift a later page and duplicate a line.
    until = args.until if args.until is not None else now_ms() + 1
    written = 0
    while True:
        page = await backend.list_exchanges(
            RequestQuery(
                session_id=args.session,
                model=args.model,
                since=args.since,
                until=until,
                limit=_EXPORT_PAGE,
                offset=written,
                oldest_first=True,
            )
        )
        for exchange in page:
            sink.write(json.dumps(exchange_json(exchange, bodies=True), ensure_ascii=False))
            sink.write("\n")
        written += len(page)
        if len(page) < _EXPORT_PAGE:
            return written


async def _cmd_export(args: argparse.Namespace, out: IO[str]) -> int:
    async with _reader(args.db) as backend:
        if args.output is None:
            await _export_to(backend, args, out)
            return 0
        target = Path(args.output)
        # Written beside the target and renamed: a failed export leaves no half file.
        partial = target.with_name(target.name + ".partial")
        try:
            with partial.open("w", encoding="utf-8") as sink:
                count = await _export_to(backend, args, sink)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    sys.stderr.write(f"exported {count} requests to {target}\n")
    return 0


async def _cmd_sweep(args: argparse.Namespace, out: IO[str]) -> int:
    retention: float | None = args.retention
    # A read-only look first: a missing or foreign file is refused rather than created, and
    # an older schema is not silently migrated by a sweep.
    async with _reader(args.db) as backend:
        now = now_ms()
        expired = await backend.count_sessions() - await backend.count_sessions(active_at=now)
        cutoff = None if retention is None else now - round(retention * 1000)
        old = None if cutoff is None else await backend.count_requests(RequestQuery(until=cutoff))
    if not args.dry_run:
        manager = SessionManager(
            backend_from_url(args.db), config=StoreConfig(log_retention=retention)
        )
        async with manager:
            expired = await manager.cleanup()
            old = await manager.purge_records() if retention is not None else None
    done = "to delete" if args.dry_run else "deleted"
    out.write(f"expired sessions {done}: {expired}\n")
    if retention is None or cutoff is None:
        out.write("old requests: kept (no --retention given)\n")
    else:
        age = format_duration_ms(round(retention * 1000))
        out.write(
            f"old requests {done}: {old} (with their responses; older than {age},"
            f" before {format_local(cutoff)})\n"
        )
    return 0


async def _schema_version(db: str, *, missing: int | None = None) -> int | None:
    """The store's schema version, read without changing anything.

    `missing` is the answer for a store that does not exist yet (None: that is an error).
    None is returned when the backend refuses an older schema without saying which it is.
    """
    try:
        async with _reader(db) as backend:
            return await backend.schema_version()
    except DatabaseNotFoundError:
        if missing is None:
            raise
        return missing
    except SchemaVersionError as exc:
        found = getattr(exc, "found", None)
        if isinstance(found, int) and found <= latest_version():
            return found
        if found is None and "newer" not in str(exc):
            return None
        raise


async def _cmd_migrate(args: argparse.Namespace, out: IO[str]) -> int:
    latest = latest_version()
    if args.list:
        version = await _schema_version(args.db)
        if version is None:
            raise CliError(
                "the store's schema is older than this package's and the backend does not say"
                f" which version it is at; run `{PROG} --db ... migrate` to bring it to {latest}"
            )
        pending = [m for m in MIGRATIONS if m.version > version]
        out.write(f"schema version {version}; this package's latest is {latest}\n")
        for m in pending:
            out.write(f"pending  {m.version}  {m.name}\n")
        if not pending:
            out.write("nothing to migrate\n")
        return 0
    before = await _schema_version(args.db, missing=0)
    backend = backend_from_url(args.db)
    await backend.open()  # a writable open applies whatever is pending
    try:
        after = await backend.schema_version()
    finally:
        await backend.close()
    if before is None:
        out.write(f"migrated to schema version {after}\n")
        return 0
    for m in MIGRATIONS:
        if before < m.version <= after:
            out.write(f"applied  {m.version}  {m.name}\n")
    suffix = " (already up to date)" if before == after else ""
    out.write(f"schema version {after}{suffix}\n")
    return 0


async def _cmd_backup(args: argparse.Namespace, out: IO[str]) -> int:
    # The source is only read (SQLite's online backup API copies it page by page, consistent
    # even while a proxy writes); the backend refuses to overwrite an existing PATH.
    async with _reader(args.db) as backend:
        try:
            await backend.backup(args.path)
        except NotImplementedError as exc:
            raise CliError(str(exc)) from None
    # Open the copy as any reader would: a backup that cannot be read is no backup.
    async with _reader(args.path) as copy:
        sessions = await copy.count_sessions()
        requests = await copy.count_requests(RequestQuery())
    out.write(f"backed up {sessions} sessions and {requests} requests to {args.path}\n")
    return 0


# -- the parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # SUPPRESS: `--db` after the command overrides the global one only when given.
    common.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser = _Parser(
        prog=PROG,
        description="Inspect and operate an aiohttp_session_store database.",
        epilog=f"The store is --db, else ${DB_ENV}, else {DEFAULT_DB}. See docs/cli.md.",
    )
    parser.add_argument(
        "--db",
        default=os.environ.get(DB_ENV) or DEFAULT_DB,
        metavar="PATH",
        # The default is not shown: from the environment it may be a DSN with a password.
        help=f"a SQLite path, sqlite:///path or postgresql://... (default: ${DB_ENV}, else"
        f" {DEFAULT_DB})",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, run: Command, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(run=run)
        return sub

    def json_flag(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true", help="JSON output (docs/cli.md)")

    def limit(sub: argparse.ArgumentParser, default: int) -> None:
        sub.add_argument(
            "--limit",
            type=_limit_arg,
            default=default,
            metavar="N",
            help="at most N rows, 0 for all (default: %(default)s)",
        )

    def filters(sub: argparse.ArgumentParser, *, model: bool = True, until: bool = True) -> None:
        sub.add_argument("--session", type=_text_arg, metavar="ID", help="one session's requests")
        if model:
            sub.add_argument("--model", type=_text_arg, metavar="M", help="requests for model M")
        sub.add_argument(
            "--since", type=_time_arg, metavar="T", help="from T on: 2h, 7d, 2026-11-24, ..."
        )
        if until:
            sub.add_argument("--until", type=_time_arg, metavar="T", help="before T")

    sub = command("sessions", _cmd_sessions, "list sessions, newest first")
    state = sub.add_mutually_exclusive_group()
    state.add_argument("--active", action="store_true", help="only sessions not expired")
    state.add_argument("--expired", action="store_true", help="only expired, not yet swept")
    sub.add_argument(
        "--order", choices=SESSION_ORDERS, default="created_at_desc", help="(default: %(default)s)"
    )
    limit(sub, 50)
    json_flag(sub)

    sub = command("show", _cmd_show, "one session and its transcript")
    sub.add_argument("session_id", metavar="SESSION_ID")
    json_flag(sub)

    sub = command("requests", _cmd_requests, "list requests with their outcome, newest first")
    filters(sub)
    limit(sub, 50)
    json_flag(sub)

    sub = command("stats", _cmd_stats, "outcomes, tokens and latency by model")
    filters(sub)
    json_flag(sub)

    sub = command("sweep", _cmd_sweep, "delete expired sessions (and old records)")
    sub.add_argument("--dry-run", action="store_true", help="count only; change nothing")
    sub.add_argument(
        "--retention",
        type=_duration_arg,
        metavar="AGE",
        help="also delete requests and responses older than AGE (e.g. 30d)",
    )

    sub = command("export", _cmd_export, "requests with their responses as JSON lines")
    filters(sub)
    sub.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    # Accepted so that every listing takes --json: the export is JSON lines either way.
    sub.add_argument("--json", action="store_true", help="JSON lines (always; for symmetry)")

    sub = command("migrate", _cmd_migrate, "bring the schema up to date")
    sub.add_argument("--list", action="store_true", help="show pending migrations; change nothing")

    sub = command("backup", _cmd_backup, "a consistent copy of the store, even while in use")
    sub.add_argument("path", metavar="PATH", help="a new file (never overwritten)")
    return parser


def _fail(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {' '.join(message.split())}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code is returned, never raised."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        _fail(f"{exc} (see {PROG} --help)")
        return 2
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    run: Command = args.run
    try:
        return asyncio.run(run(args, sys.stdout))
    except BrokenPipeError:
        # The reader (`| head`) has gone. Point stdout at /dev/null so the interpreter's
        # final flush does not fail again, and stop quietly.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CliError, StoreError, OSError, ValueError) as exc:
        _fail(str(exc) or type(exc).__name__)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # A driver error the backends let through (a lock timeout, a dropped connection):
        # still one line, named by its type since its message alone may be terse.
        _fail(f"{type(exc).__name__}: {exc}")
        return 1
