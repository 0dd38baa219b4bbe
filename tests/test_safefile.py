"""safefile.py: exclusive temp files, no-clobber placing, and the store's own files refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from aiohttp_session_store.safefile import (
    StoreFileError,
    TargetExistsError,
    check_target,
    create_exclusive,
    place,
    store_path,
    written_atomically,
)


def test_create_exclusive_refuses_a_symlink_and_a_file(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        create_exclusive(link)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        create_exclusive(dangling)  # O_EXCL alone would refuse too; nothing is created there
    assert not (tmp_path / "nowhere").exists()
    assert victim.read_text() == "keep"


def test_place_without_force_never_replaces_what_appeared_meanwhile(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.write_text("new")
    target = tmp_path / "target"
    target.write_text("someone else's")
    with pytest.raises(TargetExistsError):
        place(temp, target, force=False)
    assert target.read_text() == "someone else's"
    place(temp, target, force=True)
    assert target.read_text() == "new"
    assert not temp.exists()


def test_written_atomically_appears_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    with written_atomically(target, force=False) as stream:
        stream.write("line\n")
        assert not target.exists()
    assert target.read_text() == "line\n"

    def interrupted() -> None:
        with written_atomically(target, force=True) as stream:
            stream.write("half")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        interrupted()
    assert target.read_text() == "line\n"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_check_target(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    db.write_bytes(b"")
    for name in ("s.db", "s.db-wal", "s.db-shm", "s.db-journal"):
        with pytest.raises(StoreFileError):
            check_target(tmp_path / name, db=str(db), force=True)
    with pytest.raises(StoreFileError):
        check_target(tmp_path / "." / "s.db", db=f"sqlite:///{db}", force=True)
    other = tmp_path / "other"
    check_target(other, db=str(db), force=False)
    other.write_text("x")
    with pytest.raises(TargetExistsError):
        check_target(other, db=str(db), force=False)
    check_target(other, db=str(db), force=True)
    # A PostgreSQL store has no file to protect.
    assert store_path("postgresql://u@h/db") is None
    check_target(other, db="postgresql://u@h/db", force=True)
