"""The CLI's commands that change or copy a store: sweep, migrate, backup."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import IO

from .backends import backend_from_url
from .commands import PROG, CliError, reader
from .config import StoreConfig
from .errors import DatabaseNotFoundError, SchemaVersionError
from .manager import SessionManager
from .migrations import MIGRATIONS, Migration, latest_version
from .models import RequestQuery, now_ms
from .safefile import check_target, place, private_dir
from .terminal import Progress, write_json
from .timeparse import format_duration_ms, format_iso, format_local

__all__ = ("cmd_backup", "cmd_migrate", "cmd_sweep")


async def cmd_sweep(args: argparse.Namespace, out: IO[str]) -> int:
    retention: float | None = args.retention
    # A read-only look first: a missing or foreign file is refused rather than created, and
    # an older schema is not silently migrated by a sweep.
    async with reader(args.db) as backend:
        now = now_ms()
        expired = await backend.count_sessions() - await backend.count_sessions(active_at=now)
        cutoff = None if retention is None else now - round(retention * 1000)
        old = None if cutoff is None else await backend.count_requests(RequestQuery(until=cutoff))
    if not args.dry_run:
        manager = SessionManager(
            backend_from_url(args.db), config=StoreConfig(log_retention=retention)
        )
        # A large purge takes a while in bounded batches: say so on a terminal.
        status = Progress(
            sys.stderr,
            "sweeping: expired sessions" + ("" if retention is None else " and old records"),
        )
        status.show()
        try:
            async with manager:
                expired = await manager.cleanup()
                old = await manager.purge_records() if retention is not None else None
        finally:
            status.finish()
    if args.json:
        write_json(
            out,
            {
                "dry_run": args.dry_run,
                "expired_sessions": expired,
                "old_requests": old,
                "retention_ms": None if retention is None else round(retention * 1000),
                "cutoff": None if cutoff is None else format_iso(cutoff),
            },
        )
        return 0
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
        async with reader(db) as backend:
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


async def cmd_migrate(args: argparse.Namespace, out: IO[str]) -> int:
    latest = latest_version()
    if args.list:
        version = await _schema_version(args.db)
        if version is None:
            raise CliError(
                "the store's schema is older than this package's and the backend does not say"
                f" which version it is at; run `{PROG} --db ... migrate` to bring it to {latest}"
            )
        pending = [m for m in MIGRATIONS if m.version > version]
        if args.json:
            write_json(
                out,
                {"schema_version": version, "latest": latest, "pending": _migrations(pending)},
            )
            return 0
        out.write(f"schema version {version}; this package's latest is {latest}\n")
        for m in pending:
            out.write(f"pending  {m.version}  {m.name}\n")
        if not pending:
            out.write("nothing to migrate\n")
        return 0
    before = await _schema_version(args.db, missing=0)
    backend = backend_from_url(args.db, adopt=args.adopt)
    await backend.open()  # a writable open applies whatever is pending
    try:
        after = await backend.schema_version()
    finally:
        await backend.close()
    applied = None if before is None else [m for m in MIGRATIONS if before < m.version <= after]
    if args.json:
        write_json(
            out,
            {
                "schema_version": after,
                "previous": before,
                "applied": None if applied is None else _migrations(applied),
            },
        )
        return 0
    if applied is None:
        out.write(f"migrated to schema version {after}\n")
        return 0
    for m in applied:
        out.write(f"applied  {m.version}  {m.name}\n")
    suffix = " (already up to date)" if before == after else ""
    out.write(f"schema version {after}{suffix}\n")
    return 0


def _migrations(items: list[Migration]) -> list[dict[str, object]]:
    return [{"version": m.version, "name": m.name} for m in items]


async def cmd_backup(args: argparse.Namespace, out: IO[str]) -> int:
    target = Path(args.path)
    check_target(target, db=args.db, force=args.force)
    # The source is only read (SQLite's online backup API copies it page by page, consistent
    # even while a proxy writes). The copy is made in a fresh private directory, checked,
    # then moved into place, so nothing planted at the target's path is ever written through.
    with private_dir(target) as work:
        copy_path = work / target.name
        async with reader(args.db) as backend:
            try:
                await backend.backup(str(copy_path))
            except NotImplementedError as exc:
                raise CliError(str(exc)) from None
        # Open the copy as any reader would: a backup that cannot be read is no backup.
        async with reader(str(copy_path)) as copy:
            sessions = await copy.count_sessions()
            requests = await copy.count_requests(RequestQuery())
        place(copy_path, target, force=args.force)
    if args.json:
        write_json(out, {"path": str(target), "sessions": sessions, "requests": requests})
    else:
        out.write(f"backed up {sessions} sessions and {requests} requests to {args.path}\n")
    return 0
