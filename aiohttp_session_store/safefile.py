"""Files the CLI writes (export, backup): never the store itself, never through a planted link.

A file is built under a fresh name created with `O_CREAT | O_EXCL | O_NOFOLLOW` (or in a fresh
private directory) beside its target, then moved into place in one step: a hard link when the
target must not be replaced (the link fails if anything appeared there meanwhile), `os.replace`
when `--force` allows it. A failed write leaves the target as it was and no temp file behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Final

__all__ = (
    "StoreFileError",
    "TargetExistsError",
    "check_target",
    "create_exclusive",
    "place",
    "private_dir",
    "store_path",
    "written_atomically",
)

#: The files SQLite keeps beside a database.
_SIDE_FILES: Final = ("", "-wal", "-shm", "-journal")


class TargetExistsError(FileExistsError):
    """The target exists and `--force` was not given."""


class StoreFileError(ValueError):
    """The target is the store's own database or one of its side files."""


def store_path(db: str) -> Path | None:
    """The SQLite file behind a `--db` value; None for a PostgreSQL URL."""
    if db.startswith(("postgresql://", "postgres://")):
        return None
    if db.startswith("sqlite:///"):
        db = db[len("sqlite:///") :]
    return Path(db)


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # a hard link, or another path to the same file
    except OSError:
        return False


def check_target(target: Path, *, db: str, force: bool) -> None:
    """Refuse a target that is the store (or its -wal/-shm/-journal) or exists without `force`."""
    store = store_path(db)
    if store is not None:
        for suffix in _SIDE_FILES:
            own = store.with_name(store.name + suffix)
            if _same(target, own):
                raise StoreFileError(f"{target} is the store's own file {own}; choose another path")
    if os.path.lexists(target) and not force:
        raise TargetExistsError(f"{target} already exists; pass --force to replace it")


def create_exclusive(path: Path) -> int:
    """A new file's descriptor; fails if anything, a symlink included, is at `path`."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)


def place(temp: Path, target: Path, *, force: bool) -> None:
    """Move the finished `temp` to `target` in one step (see the module docstring)."""
    if force:
        os.replace(temp, target)
        return
    try:
        os.link(temp, target, follow_symlinks=False)
    except FileExistsError:
        raise TargetExistsError(f"{target} already exists; pass --force to replace it") from None
    except OSError:
        # A file system without hard links: a check then a rename (a small race, no link).
        if os.path.lexists(target):
            raise TargetExistsError(
                f"{target} already exists; pass --force to replace it"
            ) from None
        os.replace(temp, target)
        return
    temp.unlink()


@contextlib.contextmanager
def written_atomically(target: Path, *, force: bool) -> Iterator[IO[str]]:
    """A text stream whose content appears at `target` only once the block completes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")
    fd = create_exclusive(temp)
    try:
        with open(fd, "w", encoding="utf-8") as stream:
            yield stream
        place(temp, target, force=force)
    finally:
        temp.unlink(missing_ok=True)


@contextlib.contextmanager
def private_dir(target: Path) -> Iterator[Path]:
    """A fresh directory beside `target` only this user can enter, removed afterwards."""
    target.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
