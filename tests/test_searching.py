"""The CLI's `search` (searching.py) on a SQLite store: table, --json, filters, bad input."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_backends_tools import store_calls

from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.cli import main


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "s.db"

    async def fill() -> None:
        backend = SQLiteBackend(path)
        await backend.open()
        try:
            await store_calls(backend)
        finally:
            await backend.close()

    asyncio.run(fill())
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_search_json_and_filters(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--db", str(db), "search", "refund", "--json")
    assert (code, err) == (0, "")
    hits = json.loads(out)
    assert [h["request_id"] for h in hits] == ["r1"]
    assert "«refund»" in hits[0]["snippet"].lower()
    assert hits[0]["response"]["reply"] == "It was sent on Monday"
    code, out, _ = run(capsys, "--db", str(db), "search", "hi", "--session", "s2", "--json")
    assert [h["request_id"] for h in json.loads(out)] == ["r3"]
    code, out, _ = run(capsys, "--db", str(db), "search", "hi", "--session", "s1", "--json")
    assert json.loads(out) == []


def test_search_table(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--db", str(db), "search", "timeout")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["TIME", "REQUEST", "SESSION", "OUTCOME", "MATCH"]
    assert "r3" in lines[1]
    assert "upstream_error" in lines[1]
    assert "«timeout»" in lines[1]
    code, out, _ = run(capsys, "--db", str(db), "search", "nothing-like-this")
    assert (code, out) == (0, "no matches\n")


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["search", '"'], 1, "no words"),
        (["search", ""], 2, "must not be empty"),
        (["search", "x", "--limit", "0"], 2, "invalid limit"),
        (["search", "x", "--since", "yesterdayish"], 2, "--since"),
    ],
)
def test_search_bad_input_is_one_line(
    db: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, says: str
) -> None:
    got, out, err = run(capsys, "--db", str(db), *argv)
    assert (got, out) == (code, "")
    assert err.count("\n") == 1
    assert says in err


def test_search_never_writes(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = db.read_bytes()
    assert run(capsys, "--db", str(db), "search", "NEAR(refund OR")[0] == 0
    assert db.read_bytes() == before
