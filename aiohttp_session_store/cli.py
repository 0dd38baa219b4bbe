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
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import IO, Any, Final, NoReturn

from . import __version__
from .commands import (
    PROG,
    CliError,
    cmd_requests,
    cmd_sessions,
    cmd_show,
    cmd_stats,
)
from .errors import StoreError
from .exporting import EXPORT_FORMATS, cmd_export
from .maintenance import cmd_backup, cmd_migrate, cmd_sweep
from .models import SESSION_ORDERS, now_ms
from .searching import cmd_search
from .timeparse import parse_duration, parse_time

__all__ = ("DB_ENV", "DEFAULT_DB", "PROG", "build_parser", "main")

#: The store used when `--db` is not given (a DSN with a password stays out of `ps`).
DB_ENV: Final = "AIOHTTP_SESSION_STORE_DB"
DEFAULT_DB: Final = "data/sessions.db"

Command = Callable[[argparse.Namespace, IO[str]], Coroutine[Any, Any, int]]


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


def _positive_arg(text: str) -> int:
    if not (text.isascii() and text.isdecimal()) or len(text) > 6 or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid limit {text!r}: a whole number from 1")
    return int(text)


def _text_arg(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


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

    def force(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--force", action="store_true", help="replace the file if it exists (never the store)"
        )

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

    sub = command("sessions", cmd_sessions, "list sessions, newest first")
    state = sub.add_mutually_exclusive_group()
    state.add_argument("--active", action="store_true", help="only sessions not expired")
    state.add_argument("--expired", action="store_true", help="only expired, not yet swept")
    sub.add_argument(
        "--order", choices=SESSION_ORDERS, default="created_at_desc", help="(default: %(default)s)"
    )
    limit(sub, 50)
    json_flag(sub)

    sub = command("show", cmd_show, "one session and its transcript")
    sub.add_argument("session_id", metavar="SESSION_ID")
    json_flag(sub)

    sub = command("requests", cmd_requests, "list requests with their outcome, newest first")
    filters(sub)
    limit(sub, 50)
    json_flag(sub)

    sub = command("search", cmd_search, "calls whose messages, reply or error hold TEXT")
    sub.add_argument(
        "text",
        metavar="TEXT",
        type=_text_arg,
        help='words (all must appear) and "quoted phrases"; no query syntax',
    )
    sub.add_argument("--session", type=_text_arg, metavar="ID", help="one session's calls")
    sub.add_argument("--since", type=_time_arg, metavar="T", help="from T on: 2h, 7d, ...")
    sub.add_argument(
        "--limit",
        type=_positive_arg,
        default=20,
        metavar="N",
        help="at most N matches, newest first (default: %(default)s)",
    )
    json_flag(sub)

    sub = command("stats", cmd_stats, "outcomes, tokens and latency by model")
    filters(sub)
    json_flag(sub)

    sub = command("sweep", cmd_sweep, "delete expired sessions (and old records)")
    sub.add_argument("--dry-run", action="store_true", help="count only; change nothing")
    sub.add_argument(
        "--retention",
        type=_duration_arg,
        metavar="AGE",
        help="also delete requests and responses older than AGE (e.g. 30d)",
    )
    json_flag(sub)

    sub = command("export", cmd_export, "requests with their responses as JSON lines")
    filters(sub)
    sub.add_argument("--output", "-o", metavar="FILE", help="write to FILE instead of stdout")
    force(sub)
    sub.add_argument(
        "--format",
        choices=tuple(EXPORT_FORMATS),
        default="exchanges",
        help="exchanges: one call per line, bodies included; openai-chat: one"
        ' {"messages": [...]} line per completed chat turn (default: %(default)s)',
    )
    # The export is JSON lines either way; with --output, --json puts the summary on stdout.
    sub.add_argument("--json", action="store_true", help="with --output: a JSON summary")

    sub = command("migrate", cmd_migrate, "bring the schema up to date")
    sub.add_argument("--list", action="store_true", help="show pending migrations; change nothing")
    sub.add_argument(
        "--adopt",
        action="store_true",
        help="add the store's tables to a database that already holds other tables",
    )
    json_flag(sub)

    sub = command("backup", cmd_backup, "a consistent copy of the store, even while in use")
    sub.add_argument("path", metavar="PATH", help="a new file (replaced only with --force)")
    force(sub)
    json_flag(sub)
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
