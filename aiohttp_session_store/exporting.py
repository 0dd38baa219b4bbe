"""The CLI's `export`: recorded calls as JSON lines (exchanges, or OpenAI chat turns)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final

from .backends.base import Backend
from .commands import reader, session_arg
from .models import Exchange, RequestQuery, now_ms
from .safefile import check_target, written_atomically
from .terminal import Progress, write_json
from .views import exchange_json, openai_chat_json

__all__ = ("EXPORT_FORMATS", "cmd_export")

_EXPORT_PAGE: Final = 1000

#: `--format` values: what one line holds (None: the call gives no line).
EXPORT_FORMATS: Final[dict[str, Callable[[Exchange], dict[str, Any] | None]]] = {
    "exchanges": lambda exchange: exchange_json(exchange, bodies=True),
    "openai-chat": openai_chat_json,
}


async def _export_to(
    backend: Backend, args: argparse.Namespace, sink: IO[str], progress: Progress
) -> tuple[int, int]:
    """Write the lines; return (lines written, calls read)."""
    # Pages are read oldest first up to a fixed end, so records written while the export
    # runs cannot shift a later page and duplicate a line. Each page starts after the key
    # (timestamp, id) of the last row read: an index range scan however deep the export is,
    # where an OFFSET re-read every earlier row (the export slowed as it went).
    until = args.until if args.until is not None else now_ms() + 1
    query = RequestQuery(session_id=args.session, model=args.model, since=args.since, until=until)
    line_of = EXPORT_FORMATS[args.format]
    read = written = 0
    after: tuple[int, int] | None = None
    while True:
        page, after = await backend.export_page(query, after, _EXPORT_PAGE)
        for exchange in page:
            line = line_of(exchange)
            if line is not None:
                sink.write(json.dumps(line, ensure_ascii=False))
                sink.write("\n")
                written += 1
        read += len(page)
        progress.update(read)
        if len(page) < _EXPORT_PAGE:
            return written, read


async def _progress(backend: Backend, args: argparse.Namespace) -> Progress:
    progress = Progress(sys.stderr, "exporting: calls read")
    if progress.active:
        # Counted only for a person watching: a pipe or a log pays no extra query.
        total = await backend.count_requests(
            RequestQuery(
                session_id=args.session, model=args.model, since=args.since, until=args.until
            )
        )
        progress = Progress(sys.stderr, "exporting: calls read", total)
    return progress


async def cmd_export(args: argparse.Namespace, out: IO[str]) -> int:
    if args.output is None:
        async with reader(args.db) as backend:
            await session_arg(backend, args)
            progress = await _progress(backend, args)
            try:
                await _export_to(backend, args, out, progress)
            finally:
                progress.finish()
        return 0
    target = Path(args.output)
    # Refused before anything is read: the store's own files, and (without --force) any
    # existing file. The file is then built under a fresh name and moved into place.
    check_target(target, db=args.db, force=args.force)
    async with reader(args.db) as backend:
        await session_arg(backend, args)
        progress = await _progress(backend, args)
        try:
            with written_atomically(target, force=args.force) as sink:
                written, read = await _export_to(backend, args, sink, progress)
        finally:
            progress.finish()
    if args.json:
        summary = {"path": str(target), "format": args.format, "lines": written, "calls": read}
        write_json(out, summary)
    elif args.format == "exchanges":
        sys.stderr.write(f"exported {written} requests to {target}\n")
    else:
        sys.stderr.write(
            f"exported {written} conversation turns to {target}"
            f" ({read - written} of {read} calls were not completed chat turns)\n"
        )
    return 0
