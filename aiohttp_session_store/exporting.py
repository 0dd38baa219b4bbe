"""The CLI's `export`: requests with their responses as JSON lines, to stdout or a file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO, Final

from .backends.base import Backend
from .commands import reader
from .models import RequestQuery, now_ms
from .safefile import check_target, written_atomically
from .views import exchange_json

__all__ = ("cmd_export",)

_EXPORT_PAGE: Final = 500


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


async def cmd_export(args: argparse.Namespace, out: IO[str]) -> int:
    if args.output is None:
        async with reader(args.db) as backend:
            await _export_to(backend, args, out)
        return 0
    target = Path(args.output)
    # Refused before anything is read: the store's own files, and (without --force) any
    # existing file. The file is then built under a fresh name and moved into place.
    check_target(target, db=args.db, force=args.force)
    async with reader(args.db) as backend:
        with written_atomically(target, force=args.force) as sink:
            count = await _export_to(backend, args, sink)
    sys.stderr.write(f"exported {count} requests to {target}\n")
    return 0
