"""The CLI's `search`: recorded calls whose messages, reply or error hold some words."""

from __future__ import annotations

import argparse
from typing import IO

from .commands import reader, session_arg
from .terminal import clean, opt, short, table, terminal_width, write_json
from .timeparse import format_local
from .views import hit_json

__all__ = ("cmd_search",)


async def cmd_search(args: argparse.Namespace, out: IO[str]) -> int:
    async with reader(args.db) as backend:
        await session_arg(backend, args)
        hits = await backend.search(
            args.text, limit=args.limit, session_id=args.session, since=args.since
        )
    if args.json:
        write_json(out, [hit_json(h) for h in hits])
        return 0
    if not hits:
        out.write("no matches\n")
        return 0
    rows = []
    for hit in hits:
        req, resp = hit.exchange.request, hit.exchange.response
        rows.append(
            [
                format_local(req.timestamp),
                req.request_id,
                opt(req.session_id),
                resp.outcome if resp else "(pending)",
                short(clean(hit.snippet), 200),
            ]
        )
    headers = ["TIME", "REQUEST", "SESSION", "OUTCOME", "MATCH"]
    lines = table(headers, rows, width=terminal_width(out), fit=frozenset({2, 4}))
    out.write("\n".join(lines) + "\n")
    return 0
