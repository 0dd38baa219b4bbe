"""The command line (cli.py) on databases filled through the middleware.

`main([...])` runs in-process with its output captured; the exit codes and one-line errors a
shell sees are also checked through `python -m aiohttp_session_store` in a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient
from test_query import (  # the chat app and conversations shared with the query API tests
    FILLED,
    HELLO,
    INJECTIONS,
    STORY,
    STREAM_PIECES,
    chat_app,
    converse,
    post,
)

from aiohttp_session_store.backends import backend_from_url
from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.cli import DB_ENV, main
from aiohttp_session_store.migrations import MIGRATIONS, latest_version
from aiohttp_session_store.models import (
    Outcome,
    RequestRecord,
    ResponseRecord,
    Session,
    WriteBatch,
    now_ms,
)

PG_DSN = os.environ.get("AIOHTTP_SESSION_STORE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ISO_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
DAY = 86_400_000
ERROR_LINE = re.compile(r"aiohttp-session-store: error: \S.*\n")

Run = Callable[..., tuple[int, str, str]]


# -- filling a store -------------------------------------------------------------------------------


async def fill(database: str | Backend) -> None:
    """The seven calls of `converse`, through the middleware of a served app."""
    app, _ = chat_app(database)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        await converse(client)
    finally:
        await client.close()  # commits everything and closes the store


async def add_history(database: str) -> None:
    """An expired session and one call 40 days old (time travel the middleware cannot do)."""
    backend = backend_from_url(database)
    await backend.open()
    old = now_ms() - 40 * DAY
    try:
        await backend.write_batch(
            WriteBatch(
                sessions=[Session("old-session", None, "p9", "ancient", 3, old, old, old + 60_000)],
                requests=[
                    RequestRecord(
                        "old-request",
                        "old-session",
                        old,
                        "POST",
                        "/v1/chat/completions",
                        "gpt-3.5",
                        False,
                        '{"messages": []}',
                        None,
                        "{}",
                        old,
                    )
                ],
                responses=[
                    ResponseRecord(
                        "old-response",
                        "old-request",
                        "old-session",
                        old,
                        200,
                        "completed",
                        "{}",
                        None,
                        None,
                        1,
                        1,
                        2,
                        "stop",
                        None,
                        100,
                        50,
                        old,
                    )
                ],
            )
        )
    finally:
        await backend.close()


LATEST = latest_version()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "sessions.db"
    asyncio.run(fill(str(path)))
    assert sorted(p.name for p in path.parent.iterdir()) == ["sessions.db"]
    return path


@pytest.fixture
def db(template: Path, tmp_path: Path) -> Path:
    """A private copy of the filled database, alone in its directory."""
    path = tmp_path / "store" / "sessions.db"
    path.parent.mkdir()
    shutil.copyfile(template, path)
    return path


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    monkeypatch.delenv("COLUMNS", raising=False)  # tables are cut only where a test says so

    def run(*argv: str | Path) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def run_json(run: Run, *argv: str | Path) -> Any:
    code, out, err = run(*argv, "--json")
    assert (code, err) == (0, ""), err
    return json.loads(out)


def rows(path: Path) -> dict[str, int]:
    """Row counts per table, read with sqlite3 itself (not through the package)."""
    uri = path.resolve().as_uri() + "?mode=ro&immutable=1"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- sessions --------------------------------------------------------------------------------------


def test_sessions_table(run: Run, db: Path) -> None:
    code, out, err = run("--db", db, "sessions")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "CHAT",
        "PARENT",
        "MSGS",
        "CREATED",
        "LAST",
        "USED",
        "EXPIRES",
        "FIRST",
        "MESSAGE",
    ]
    assert len(lines) == 1 + FILLED.sessions
    hello = next(line for line in lines if line.startswith(FILLED.hello))
    assert f"chat-{FILLED.hello[:8]}" in hello
    assert " msg-2 " in hello
    assert hello.endswith(HELLO)
    assert "in 30m" in hello or "in 29m" in hello
    story = next(line for line in lines if line.startswith(FILLED.story))
    # Shortened to one line of 40 characters, the newline gone.
    assert story.endswith("Write a haiku about the sea with a seco…")


@pytest.mark.parametrize("command", [["sessions"], ["requests"]])
def test_tables_fit_columns(
    run: Run, db: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    wide = run("--db", db, *command)[1].splitlines()
    width = max(len(line) for line in wide) - 10
    monkeypatch.setenv("COLUMNS", str(width))
    code, out, _ = run("--db", db, *command)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(wide)
    assert max(len(line) for line in lines) <= width
    assert any("…" in line for line in lines)
    # Ids are never cut: they are what `show` and `--session` take.
    assert {FILLED.hello, FILLED.story} <= {word for line in lines for word in line.split()}


def test_stats_table_cuts_long_model_names_to_fit(
    run: Run, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = "a-very-long-fine-tuned-model-name-2026-11-24-with-a-suffix"
    batch = _requests({"model": model, "messages": []}, session="long")
    batch.requests[0] = replace(batch.requests[0], model=model)
    t = now_ms()
    batch.responses.append(
        ResponseRecord(
            "r-long",
            "long-0",
            "long",
            t,
            200,
            "completed",
            "{}",
            None,
            None,
            None,
            None,
            None,
            "stop",
            None,
            5,
            5,
            t,
        )
    )
    write(db, batch)
    wide = run("--db", db, "stats")[1].splitlines()
    assert wide[1].split()[0] == model[:31] + "…"  # the stats table's own cap
    width = max(len(line) for line in wide) - 15
    monkeypatch.setenv("COLUMNS", str(width))
    lines = run("--db", db, "stats")[1].splitlines()
    assert max(len(line) for line in lines) <= width
    names = [line.split()[0] for line in lines]
    assert names == ["MODEL", model[:16] + "…", "gpt-4o", "qwen-max", "all"]


def test_sessions_json(run: Run, db: Path) -> None:
    sessions = run_json(run, "--db", db, "sessions")
    assert [s["id"] for s in sessions][-1] == FILLED.hello  # newest first
    assert len(sessions) == FILLED.sessions
    hello = sessions[-1]
    assert hello == {
        "id": FILLED.hello,
        "chat_id": f"chat-{FILLED.hello[:8]}",
        "parent_id": "msg-2",
        "first_user_message": HELLO,
        "message_count": 2,
        "created_at": hello["created_at"],
        "last_accessed": hello["last_accessed"],
        "expires_at": hello["expires_at"],
        "expired": False,
    }
    for key in ("created_at", "last_accessed", "expires_at"):
        assert ISO_RE.fullmatch(hello[key])
    story = next(s for s in sessions if s["id"] == FILLED.story)
    assert story["first_user_message"] == STORY  # whole, never shortened in JSON


def test_sessions_filters_limit_and_order(run: Run, db: Path) -> None:
    asyncio.run(add_history(str(db)))
    assert len(run_json(run, "--db", db, "sessions")) == FILLED.sessions + 1
    assert len(run_json(run, "--db", db, "sessions", "--active")) == FILLED.sessions
    expired = run_json(run, "--db", db, "sessions", "--expired")
    assert [(s["id"], s["expired"]) for s in expired] == [("old-session", True)]
    assert len(run_json(run, "--db", db, "sessions", "--limit", "2")) == 2
    assert len(run_json(run, "--db", db, "sessions", "--limit", "0")) == FILLED.sessions + 1
    oldest = run_json(run, "--db", db, "sessions", "--order", "created_at_asc", "--limit", "2")
    assert [s["id"] for s in oldest] == ["old-session", FILLED.hello]
    _code, out, _ = run("--db", db, "sessions", "--expired")
    assert "expired 39d 23h ago" in out  # expired a minute after it was created


def test_sessions_empty(run: Run, db: Path) -> None:
    assert run("--db", db, "sessions", "--expired") == (0, "no sessions\n", "")
    assert run_json(run, "--db", db, "sessions", "--expired") == []


def test_db_option_after_the_command_and_from_the_environment(
    run: Run, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(run_json(run, "sessions", "--db", db)) == FILLED.sessions
    monkeypatch.setenv(DB_ENV, str(db))
    assert len(run_json(run, "sessions")) == FILLED.sessions
    code, _, err = run("--db", db.with_name("other.db"), "sessions")
    assert code == 1
    assert "other.db" in err


# -- show ------------------------------------------------------------------------------------------


def test_show_transcript(run: Run, db: Path) -> None:
    code, out, err = run("--db", db, "show", FILLED.story)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"session    {FILLED.story}"
    assert "messages   2" in lines
    first = lines.index(next(line for line in lines if line.startswith("#1 ")))
    assert "qwen-max  stream  200 completed  tokens 10/5/15" in lines[first]
    assert "first byte" in lines[first]
    assert lines[first + 1] == "    system: Be brief."
    # The whole first message, its newline kept as a continuation line.
    assert lines[first + 2] == "    user:  Write a haiku about the sea"
    assert lines[first + 3] == "           with a second line, so that it is longer than forty"
    assert lines[first + 4] == "    reply: " + "".join(STREAM_PIECES)
    assert any(line.startswith("#2 ") for line in lines)
    assert "    user:  Another one" in lines


def test_show_json(run: Run, db: Path) -> None:
    shown = run_json(run, "--db", db, "show", FILLED.hello)
    assert shown["session"]["id"] == FILLED.hello
    turns = shown["requests"]
    assert [t["user_message"] for t in turns] == [HELLO, "Tell me more"]  # oldest first
    assert [t["response"]["reply"] for t in turns] == [f"echo: {HELLO}", "echo: Tell me more"]
    for turn in turns:
        assert turn["session_id"] == FILLED.hello
        assert ISO_RE.fullmatch(turn["timestamp"])
        response = turn["response"]
        assert response["outcome"] == "completed"
        assert (response["prompt_tokens"], response["total_tokens"]) == (10, 15)
        assert isinstance(response["duration_ms"], int)
        assert "openai_response" not in response
    assert turns[1]["response"]["parent_id"] == "msg-2"


def test_show_and_filters_take_an_id_prefix(run: Run, db: Path) -> None:
    prefix = FILLED.story[:6]
    shown = run_json(run, "--db", db, "show", prefix)
    assert shown["session"]["id"] == FILLED.story
    assert shown["turns"] == 2  # completed calls, counted from the records
    listed = run_json(run, "--db", db, "requests", "--session", prefix)
    assert {r["session_id"] for r in listed} == {FILLED.story}
    stats = run_json(run, "--db", db, "stats", "--session", prefix)
    assert stats["requests"] == len(listed)


def test_ambiguous_id_prefix_is_one_line_naming_the_candidates(run: Run, db: Path) -> None:
    write(
        db, WriteBatch(sessions=[Session(i, None, None, "x", 0, 1, 1, 2) for i in ("ab1", "ab2")])
    )
    code, out, err = run("--db", db, "show", "ab")
    assert (code, out) == (1, "")
    assert ERROR_LINE.fullmatch(err)
    assert "ambiguous" in err
    assert "ab1, ab2" in err
    code, _, err = run("--db", db, "requests", "--session", "ab")
    assert code == 1
    assert "ab1, ab2" in err


OUTCOMES_OF_TWO: tuple[Outcome, Outcome] = ("completed", "upstream_error")


def test_show_counts_turns_for_a_proxy_that_never_advances(run: Run, db: Path) -> None:
    now = now_ms()
    batch = _requests({"messages": [{"role": "user", "content": "hi"}]}, {"messages": []})
    batch.sessions.append(Session("sys-session", None, None, "hi", 0, now, now, now + DAY))
    batch.responses += [
        ResponseRecord(
            f"resp-{r.request_id}",
            r.request_id,
            "sys-session",
            r.timestamp,
            200,
            outcome,
            "{}",
            None,
            None,
            None,
            None,
            None,
            "stop",
            None,
            10,
            5,
            r.timestamp,
        )
        for r, outcome in zip(batch.requests, OUTCOMES_OF_TWO, strict=True)
    ]
    write(db, batch)
    code, out, _ = run("--db", db, "show", "sys-session")
    assert code == 0
    assert "messages   0" in out.splitlines()  # update_parent_id was never called
    assert "turns      1 completed calls" in out.splitlines()


def _requests(*bodies: dict[str, Any], session: str = "sys-session") -> WriteBatch:
    t = now_ms() - 10_000
    return WriteBatch(
        requests=[
            RequestRecord(
                f"{session}-{i}",
                session,
                t + i,
                "POST",
                "/v1/chat/completions",
                "m",
                False,
                json.dumps(body),
                None,
                "{}",
                t + i,
            )
            for i, body in enumerate(bodies)
        ]
    )


def write(db: Path, batch: WriteBatch) -> None:
    async def go() -> None:
        backend = backend_from_url(str(db))
        await backend.open()
        try:
            await backend.write_batch(batch)
        finally:
            await backend.close()

    asyncio.run(go())


def test_show_gives_the_system_prompt_when_it_appears_or_changes(run: Run, db: Path) -> None:
    system = {"role": "system", "content": "You are terse.\nAnswer in French."}
    write(
        db,
        _requests(
            {"messages": [system, {"role": "user", "content": "hi"}]},
            {"messages": [system, {"role": "user", "content": "again"}]},
            {"messages": [{"role": "developer", "content": "Now English."}]},
        ),
    )
    code, out, _ = run("--db", db, "show", "sys-session")
    assert code == 0
    lines = out.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("#1 ")))
    assert lines[first + 1 : first + 4] == [
        "    system: You are terse.",
        "            Answer in French.",
        "    user:  hi",
    ]
    # Resent unchanged on turn 2: not repeated; changed on turn 3: shown again.
    assert [line for line in lines if line.startswith("    system:")] == [
        "    system: You are terse.",
        "    system: Now English.",
    ]
    turns = run_json(run, "--db", db, "show", "sys-session")["requests"]
    assert [t["system_prompt"] for t in turns] == [
        "You are terse.\nAnswer in French.",
        "You are terse.\nAnswer in French.",
        "Now English.",
    ]
    write(db, _requests({"messages": [{"role": "user", "content": "no system"}]}, session="bare"))
    assert run_json(run, "--db", db, "show", "bare")["requests"][0]["system_prompt"] is None


def test_show_errors_and_outcomes(run: Run, db: Path) -> None:
    code, out, _ = run("--db", db, "show", FILLED.crash)
    assert code == 0
    assert "handler_error" in out
    assert "    error: RuntimeError: handler bug" in out.splitlines()
    code, out, _err = run("--db", db, "show", FILLED.fail)
    assert "502 upstream_error" in out
    assert "    reply: [error] bad gateway" in out.splitlines()


def test_show_unknown_session(run: Run, db: Path) -> None:
    code, out, err = run("--db", db, "show", "no-such-session")
    assert (code, out) == (1, "")
    assert ERROR_LINE.fullmatch(err)
    assert "no session 'no-such-session'" in err


def test_show_a_swept_session_still_shows_its_records(run: Run, db: Path) -> None:
    asyncio.run(add_history(str(db)))
    assert run("--db", db, "sweep")[0] == 0
    code, out, _ = run("--db", db, "show", "old-session")
    assert code == 0
    assert out.startswith("session    old-session (row gone: expired or deleted)")
    assert "gpt-3.5" in out
    shown = run_json(run, "--db", db, "show", "old-session")
    assert shown["session"] is None
    assert [t["request_id"] for t in shown["requests"]] == ["old-request"]


def test_terminal_escapes_in_records_are_neutralised(run: Run, db: Path) -> None:
    async def hostile() -> None:
        app, _store = chat_app(str(db))
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            await post(client, "gpt-4o", "\x1b[2J\x1b]0;pwned\x07 hi \u202egnp.exe")
        finally:
            await client.close()

    asyncio.run(hostile())
    for argv in (["sessions"], ["requests"]):
        code, out, _ = run("--db", db, *argv)
        assert code == 0
        assert "\x1b" not in out
        assert "\x07" not in out
        assert "\u202e" not in out
        assert "␛[2J" in out
    session = run_json(run, "--db", db, "sessions", "--limit", "1")[0]
    code, out, _ = run("--db", db, "show", session["id"])
    assert "\x1b" not in out
    assert "␛]0;pwned␇ hi \ufffdgnp.exe" in out
    # JSON keeps the text exactly; json.dumps escapes the control characters itself.
    assert session["first_user_message"].startswith("\x1b[2J")


# -- requests --------------------------------------------------------------------------------------


def test_requests_table(run: Run, db: Path) -> None:
    code, out, err = run("--db", db, "requests")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["TIME", "SESSION", "MODEL"]
    assert len(lines) == 1 + FILLED.requests
    assert FILLED.hello in lines[-1]
    assert lines[-1].endswith(HELLO)
    assert "upstream_error" in out
    assert "handler_error" in out
    no_session = next(line for line in lines if line.split()[2] == "-")
    assert "completed" in no_session


def test_requests_json(run: Run, db: Path) -> None:
    listed = run_json(run, "--db", db, "requests")
    assert len(listed) == FILLED.requests
    assert set(listed[0]) == {
        "request_id",
        "session_id",
        "timestamp",
        "method",
        "path",
        "model",
        "stream",
        "user_message",
        "system_prompt",
        "response",
    }
    assert set(listed[0]["response"]) == {
        "response_id",
        "timestamp",
        "status_code",
        "outcome",
        "finish_reason",
        "parent_id",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "duration_ms",
        "first_byte_ms",
        "error",
        "reply",
    }
    streamed = [r for r in listed if r["stream"]]
    assert [r["response"]["reply"] for r in streamed] == ["".join(STREAM_PIECES)] * 2


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--session", FILLED.hello], 2),
        (["--model", "qwen-max"], 3),
        (["--model", "gpt-4o", "--session", FILLED.hello], 2),
        (["--since", "1h"], 7),
        (["--since", "2000-01-01"], 7),
        (["--until", "1h"], 0),
        (["--since", "2099-01-01T00:00"], 0),
        (["--limit", "3"], 3),
        (["--limit", "0"], 7),
    ],
)
def test_requests_filters(run: Run, db: Path, argv: list[str], expected: int) -> None:
    assert len(run_json(run, "--db", db, "requests", *argv)) == expected


def test_requests_empty(run: Run, db: Path) -> None:
    assert run("--db", db, "requests", "--model", "nope") == (0, "no requests\n", "")


# -- stats -----------------------------------------------------------------------------------------


def test_stats_json(run: Run, db: Path) -> None:
    stats = run_json(run, "--db", db, "stats")
    assert stats["requests"] == FILLED.requests
    assert stats["outcomes"] == {
        "completed": 5,
        "client_disconnected": 0,
        "upstream_error": 1,
        "handler_error": 1,
    }
    assert stats["tokens"] == {"prompt": 50, "completion": 25, "total": 75}
    assert stats["calls_without_usage"] == 2  # the upstream error and the handler error
    assert set(stats["duration_ms"]) == {"p50", "p95"}
    assert [m["model"] for m in stats["by_model"]] == ["gpt-4o", "qwen-max"]
    assert [m["requests"] for m in stats["by_model"]] == [4, 3]
    one = run_json(run, "--db", db, "stats", "--session", FILLED.story)
    assert (one["requests"], one["tokens"]["total"]) == (2, 30)
    assert run_json(run, "--db", db, "stats", "--since", "2099-01-01")["requests"] == 0


def test_stats_table(run: Run, db: Path) -> None:
    code, out, _ = run("--db", db, "stats")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "CALLS", "OK"]
    assert [line.split()[:5] for line in lines[1:]] == [
        ["gpt-4o", "4", "3", "0", "1"],
        ["qwen-max", "3", "2", "0", "0"],
        ["all", "7", "5", "0", "1"],
    ]
    headers = re.split(r"\s{2,}", lines[0])
    assert headers[9] == "NO USAGE"
    assert [line.split()[9] for line in lines[1:]] == ["1", "1", "2"]
    assert run("--db", db, "stats", "--until", "2000-01-01") == (0, "no responses recorded\n", "")


# -- export ----------------------------------------------------------------------------------------


def test_export_to_stdout(run: Run, db: Path) -> None:
    code, out, err = run("--db", db, "export")
    assert (code, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == FILLED.requests
    assert lines[0]["user_message"] == HELLO  # oldest first
    first = lines[0]
    # Bodies are JSON values (`jq .openai_request.model` works, no `fromjson`).
    assert first["openai_request"]["messages"][-1]["content"] == HELLO
    assert first["headers"]["Authorization"] == "[REDACTED]"
    assert first["response"]["openai_response"]["choices"][0]["message"] == {
        "role": "assistant",
        "content": f"echo: {HELLO}",
    }
    assert "upstream_response" in first["response"]
    assert "upstream_request" in first


def test_export_takes_json_like_every_listing(run: Run, db: Path) -> None:
    plain = run("--db", db, "export")
    with_flag = run("--db", db, "export", "--json")
    assert with_flag[0] == 0
    assert with_flag[1] == plain[1]


def test_export_keeps_bodies_that_are_not_json_as_text(run: Run, db: Path) -> None:
    cut = json.dumps({"truncated": True, "original_bytes": 9, "prefix": '{"mess'})
    batch = _requests({}, session="odd")
    batch.requests[0] = replace(batch.requests[0], openai_request="not json {")
    batch.requests.append(replace(batch.requests[0], request_id="odd-cut", openai_request=cut))
    write(db, batch)
    lines = [
        json.loads(line) for line in run("--db", db, "export", "--session", "odd")[1].splitlines()
    ]
    assert [line["openai_request"] for line in lines] == [
        "not json {",
        {"truncated": True, "original_bytes": 9, "prefix": '{"mess'},
    ]


def test_export_openai_chat_format(run: Run, db: Path) -> None:
    code, out, err = run("--db", db, "export", "--format", "openai-chat")
    assert (code, err) == (0, "")
    lines = [json.loads(line) for line in out.splitlines()]
    # The four completed chat turns; the call without a user message is a turn too (its
    # request has messages and its reply an assistant message); errors are not.
    assert len(lines) == 5
    assert all(list(line) == ["messages"] for line in lines)
    second = lines[1]["messages"]
    assert [m["role"] for m in second][-2:] == ["user", "assistant"]
    assert second[-2]["content"] == "Tell me more"
    assert second[-1] == {"role": "assistant", "content": "echo: Tell me more"}
    streamed = lines[2]["messages"]
    assert streamed[-1] == {"role": "assistant", "content": "".join(STREAM_PIECES)}
    assert streamed[0] == {"role": "system", "content": "Be brief."}


def test_export_openai_chat_keeps_tool_calls_and_tools(run: Run, db: Path) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    batch = _requests({"messages": [{"role": "user", "content": "use f"}], "tools": tools})
    reply = {
        "choices": [
            {
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls",
            }
        ]
    }
    t = now_ms()
    batch.responses.append(
        ResponseRecord(
            "r-tool",
            "sys-session-0",
            "sys-session",
            t,
            200,
            "completed",
            json.dumps(reply),
            None,
            None,
            1,
            1,
            2,
            "tool_calls",
            None,
            5,
            5,
            t,
        )
    )
    write(db, batch)
    out = run("--db", db, "export", "--format", "openai-chat", "--session", "sys-session")[1]
    assert [json.loads(line) for line in out.splitlines()] == [
        {
            "messages": [
                {"role": "user", "content": "use f"},
                {"role": "assistant", "tool_calls": [call]},
            ],
            "tools": tools,
        }
    ]


def test_export_to_a_file_summarises(run: Run, db: Path, tmp_path: Path) -> None:
    target = tmp_path / "turns.jsonl"
    code, out, err = run("--db", db, "export", "--format", "openai-chat", "-o", target)
    assert (code, out) == (0, "")
    assert err == (
        f"exported 5 conversation turns to {target} (2 of 7 calls were not completed chat turns)\n"
    )
    summary = run_json(run, "--db", db, "export", "-o", tmp_path / "all.jsonl")
    assert summary == {
        "path": str(tmp_path / "all.jsonl"),
        "format": "exchanges",
        "lines": FILLED.requests,
        "calls": FILLED.requests,
    }


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_export_shows_progress_on_a_terminal_only(
    run: Run, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.jsonl"
    assert run("--db", db, "export", "-o", target)[2] == f"exported 7 requests to {target}\n"
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert run("--db", db, "export", "-o", target, "--force")[0] == 0
    shown = tty.getvalue()
    assert "\rexporting: calls read 7/7 (100%)\x1b[K" in shown
    # The line is erased before the summary, so only the summary stays on screen.
    assert shown.endswith(f"\r\x1b[Kexported 7 requests to {target}\n")


def test_backup_creates_missing_parent_directories(run: Run, db: Path, tmp_path: Path) -> None:
    target = tmp_path / "backups" / "nightly" / "copy.db"
    code, _, err = run("--db", db, "backup", target)
    assert (code, err) == (0, "")
    assert rows(target) == rows(db)


def test_export_to_file_with_filters(run: Run, db: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "story.jsonl"
    target.parent.mkdir()
    code, out, err = run("--db", db, "export", "--session", FILLED.story, "--output", target)
    assert (code, out) == (0, "")
    assert err == f"exported 2 requests to {target}\n"
    exported = [json.loads(line) for line in target.read_text("utf-8").splitlines()]
    assert [e["user_message"] for e in exported] == [STORY, "Another one"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["story.jsonl"]
    code, _, err = run("--db", db, "export", "--model", "gpt-4o", "-o", target)
    assert code == 1
    assert ERROR_LINE.fullmatch(err)
    assert "--force" in err
    assert len(target.read_text("utf-8").splitlines()) == 2  # untouched
    argv = ["--db", db, "export", "--model", "gpt-4o", "--since", "1h", "-o", target, "--force"]
    assert run(*argv)[0] == 0
    assert len(target.read_text("utf-8").splitlines()) == 4
    assert sorted(p.name for p in target.parent.iterdir()) == ["story.jsonl"]


# -- files the CLI writes ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
@pytest.mark.parametrize("force", [False, True])
def test_export_refuses_the_store_and_its_side_files(
    run: Run, db: Path, suffix: str, force: bool
) -> None:
    own = db.with_name(db.name + suffix)
    if suffix:
        own.write_bytes(b"")  # as a running proxy leaves them
    before = {p.name: p.read_bytes() for p in db.parent.iterdir()}
    code, out, err = run("--db", db, "export", "-o", own, *(["--force"] if force else []))
    assert (code, out) == (1, "")
    assert ERROR_LINE.fullmatch(err)
    assert "store's own file" in err
    assert {p.name: p.read_bytes() for p in db.parent.iterdir()} == before


def test_export_and_backup_refuse_the_store_by_another_path(
    run: Run, db: Path, tmp_path: Path
) -> None:
    link = tmp_path / "alias.db"
    link.symlink_to(db)
    hard = tmp_path / "hard.db"
    os.link(db, hard)
    digest = sha256(db)
    for target in (link, hard, Path(os.path.relpath(db))):
        for command in (["export", "-o", target], ["backup", target]):
            code, _, err = run("--db", f"sqlite:///{db}", *command, "--force")
            assert code == 1, (command, err)
            assert "store's own file" in err
    assert sha256(db) == digest


def test_export_does_not_follow_a_planted_partial_link(run: Run, db: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "out.jsonl"
    planted = tmp_path / "out.jsonl.partial"
    planted.symlink_to(victim)
    code, _, err = run("--db", db, "export", "-o", target)
    assert (code, err) == (0, f"exported {FILLED.requests} requests to {target}\n")
    assert victim.read_text() == "precious\n"
    assert planted.is_symlink()  # left alone, not written through nor renamed
    assert not target.is_symlink()
    assert len(target.read_text("utf-8").splitlines()) == FILLED.requests
    assert sorted(p.name for p in tmp_path.iterdir() if ".partial" in p.name) == [planted.name]


def test_export_force_replaces_a_symlink_not_what_it_points_to(
    run: Run, db: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "out.jsonl"
    target.symlink_to(victim)
    assert run("--db", db, "export", "-o", target)[0] == 1  # exists (as a link)
    assert run("--db", db, "export", "-o", target, "--force")[0] == 0
    assert victim.read_text() == "precious\n"
    assert not target.is_symlink()


def test_a_failed_export_leaves_the_target_and_no_temp_file(
    run: Run, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aiohttp_session_store import exporting

    target = tmp_path / "out.jsonl"
    target.write_text("old\n")

    async def broken(*args: object) -> int:
        raise OSError("disk full")

    monkeypatch.setattr(exporting, "_export_to", broken)
    code, _, err = run("--db", db, "export", "-o", target, "--force")
    assert code == 1
    assert "disk full" in err
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl", "store"]


def test_backup_force_replaces_an_existing_copy(run: Run, db: Path, tmp_path: Path) -> None:
    target = tmp_path / "copy.db"
    target.write_text("an old backup\n")
    code, _, err = run("--db", db, "backup", target)
    assert code == 1
    assert "--force" in err
    assert target.read_text() == "an old backup\n"
    code, _out, err = run("--db", db, "backup", target, "--force")
    assert (code, err) == (0, ""), err
    assert rows(target) == rows(db)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.db", "store"]


def test_backup_does_not_follow_a_planted_link(run: Run, db: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    target = tmp_path / "copy.db"
    for name in ("copy.db.partial", "copy.db-journal", "copy.db-wal"):
        (tmp_path / name).symlink_to(victim)
    assert run("--db", db, "backup", target)[0] == 0
    assert victim.read_text() == "precious\n"
    assert rows(target) == rows(db)


def test_export_pages_through_many_records(run: Run, db: Path) -> None:
    async def many() -> None:
        backend = backend_from_url(str(db))
        await backend.open()
        t = now_ms() - 1000
        requests = [
            RequestRecord(
                f"bulk-{i:04d}",
                None,
                t + i // 100,
                "POST",
                "/v1/chat/completions",
                "bulk",
                False,
                None,
                None,
                None,
                t,
            )
            for i in range(1203)
        ]
        await backend.write_batch(WriteBatch(requests=requests))
        await backend.close()

    asyncio.run(many())
    _code, out, _ = run("--db", db, "export", "--model", "bulk")
    ids = [json.loads(line)["request_id"] for line in out.splitlines()]
    assert ids == [f"bulk-{i:04d}" for i in range(1203)]  # every one, once, in order


# -- sweep -----------------------------------------------------------------------------------------


def test_sweep_json(run: Run, db: Path) -> None:
    asyncio.run(add_history(str(db)))
    dry = run_json(run, "--db", db, "sweep", "--dry-run", "--retention", "30d")
    assert ISO_RE.fullmatch(dry.pop("cutoff"))
    assert dry == {
        "dry_run": True,
        "expired_sessions": 1,
        "old_requests": 1,
        "retention_ms": 30 * DAY,
    }
    done = run_json(run, "--db", db, "sweep")
    assert done == {
        "dry_run": False,
        "expired_sessions": 1,
        "old_requests": None,
        "retention_ms": None,
        "cutoff": None,
    }
    assert run_json(run, "--db", db, "sweep", "--retention", "30d")["old_requests"] == 1


def test_sweep_says_it_is_working_on_a_terminal_only(
    run: Run, db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("--db", db, "sweep", "--retention", "30d")[2] == ""
    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert run("--db", db, "sweep", "--retention", "30d")[0] == 0
    assert tty.getvalue() == "\rsweeping: expired sessions and old records…\x1b[K\r\x1b[K"


def test_sweep_dry_run_changes_nothing(run: Run, db: Path) -> None:
    asyncio.run(add_history(str(db)))
    before, digest = rows(db), sha256(db)
    code, out, err = run("--db", db, "sweep", "--dry-run", "--retention", "30d")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "expired sessions to delete: 1"
    assert lines[1].startswith("old requests to delete: 1 (with their responses; older than 30d,")
    assert (rows(db), sha256(db)) == (before, digest)


def test_sweep_expired_sessions_keeps_records(run: Run, db: Path) -> None:
    asyncio.run(add_history(str(db)))
    before = rows(db)
    code, out, _ = run("--db", db, "sweep")
    assert code == 0
    assert out == "expired sessions deleted: 1\nold requests: kept (no --retention given)\n"
    after = rows(db)
    assert after["sessions"] == before["sessions"] - 1
    assert (after["requests"], after["responses"]) == (before["requests"], before["responses"])
    assert run("--db", db, "sweep")[1].startswith("expired sessions deleted: 0\n")


def test_sweep_with_retention_deletes_old_records_only(run: Run, db: Path) -> None:
    asyncio.run(add_history(str(db)))
    code, out, _ = run("--db", db, "sweep", "--retention", "30d")
    assert code == 0
    assert out.splitlines()[1].startswith("old requests deleted: 1 (with their responses; older")
    after = rows(db)
    assert (after["requests"], after["responses"]) == (FILLED.requests, FILLED.requests)
    assert after["sessions"] == FILLED.sessions
    assert run("--db", db, "show", "old-session")[0] == 1  # nothing of it is left
    code, out, _ = run("--db", db, "sweep", "--retention", "1w")
    assert out.splitlines()[1].startswith("old requests deleted: 0 ")


def test_sweep_refuses_a_missing_database(run: Run, tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    code, _, err = run("--db", missing, "sweep")
    assert code == 1
    assert ERROR_LINE.fullmatch(err)
    assert not missing.exists()  # not created by a writable open


# -- migrate and backup ----------------------------------------------------------------------------


def test_migrate_list_on_a_current_database(run: Run, db: Path) -> None:
    digest = sha256(db)
    code, out, _ = run("--db", db, "migrate", "--list")
    assert code == 0
    assert (
        out == f"schema version {LATEST}; this package's latest is {LATEST}\nnothing to migrate\n"
    )
    assert sha256(db) == digest


def test_migrate_creates_and_is_idempotent(run: Run, tmp_path: Path) -> None:
    new = tmp_path / "new" / "sessions.db"
    code, out, _ = run("--db", new, "migrate")
    assert code == 0
    applied = "".join(f"applied  {m.version}  {m.name}\n" for m in MIGRATIONS)
    assert out == f"{applied}schema version {LATEST}\n"
    assert set(rows(new)) >= {"sessions", "requests", "responses", "metadata"}
    assert run("--db", new, "migrate")[1] == f"schema version {LATEST} (already up to date)\n"
    assert run("--db", new, "migrate", "--list")[1].endswith("nothing to migrate\n")


def test_migrate_json(run: Run, tmp_path: Path) -> None:
    new = tmp_path / "sessions.db"
    everything = [{"version": m.version, "name": m.name} for m in MIGRATIONS]
    assert run_json(run, "--db", new, "migrate") == {
        "schema_version": LATEST,
        "previous": 0,
        "applied": everything,
    }
    assert run_json(run, "--db", new, "migrate") == {
        "schema_version": LATEST,
        "previous": LATEST,
        "applied": [],
    }
    listed = run_json(run, "--db", new, "migrate", "--list")
    assert listed == {"schema_version": LATEST, "latest": LATEST, "pending": []}
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    listed = run_json(run, "--db", empty, "migrate", "--list")
    assert listed == {"schema_version": 0, "latest": LATEST, "pending": everything}


def test_migrate_list_on_an_older_schema_changes_nothing(run: Run, tmp_path: Path) -> None:
    # An empty file is a SQLite database at schema version 0.
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    code, out, err = run("--db", empty, "migrate", "--list")
    assert (code, err) == (0, ""), err
    pending = "".join(f"pending  {m.version}  {m.name}\n" for m in MIGRATIONS)
    assert out == f"schema version 0; this package's latest is {LATEST}\n{pending}"
    assert empty.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]


def test_migrate_refuses_a_foreign_file(run: Run, tmp_path: Path) -> None:
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a database\n")
    for argv in (["migrate"], ["migrate", "--list"]):
        code, _, err = run("--db", foreign, *argv)
        assert code == 1
        assert "not a SQLite database" in err
    assert foreign.read_text() == "not a database\n"


def test_backup_json(run: Run, db: Path, tmp_path: Path) -> None:
    target = tmp_path / "copy.db"
    assert run_json(run, "--db", db, "backup", target) == {
        "path": str(target),
        "sessions": FILLED.sessions,
        "requests": FILLED.requests,
    }


def test_every_command_takes_json(run: Run, db: Path, tmp_path: Path) -> None:
    from aiohttp_session_store.cli import build_parser

    commands = next(a.choices for a in build_parser()._actions if isinstance(a.choices, dict))
    names = set(commands)
    argv: dict[str, list[str | Path]] = {
        "sessions": ["sessions"],
        "show": ["show", FILLED.hello],
        "requests": ["requests"],
        "stats": ["stats"],
        "search": ["search", "haiku"],
        "export": ["export", "-o", tmp_path / "e.jsonl"],
        "sweep": ["sweep", "--dry-run"],
        "migrate": ["migrate", "--list"],
        "backup": ["backup", tmp_path / "b.db"],
    }
    assert names == set(argv)  # a new command must be added here, with its --json
    for name, args in argv.items():
        value = run_json(run, "--db", db, *args)
        assert isinstance(value, (dict, list)), name


def test_backup(run: Run, db: Path, tmp_path: Path) -> None:
    target = tmp_path / "copy.db"
    code, out, err = run("--db", db, "backup", target)
    assert (code, err) == (0, "")
    assert (
        out == f"backed up {FILLED.sessions} sessions and {FILLED.requests} requests to {target}\n"
    )
    assert rows(target) == rows(db)
    assert run_json(run, "--db", target, "show", FILLED.hello)["session"]["message_count"] == 2
    code, _, err = run("--db", db, "backup", target)  # never overwrites
    assert code == 1
    assert ERROR_LINE.fullmatch(err)
    assert "exists" in err


# -- the read-only guarantee -----------------------------------------------------------------------


READING = [
    ["sessions"],
    ["sessions", "--json", "--active"],
    ["sessions", "--expired"],
    ["show", FILLED.hello],
    ["show", FILLED.story, "--json"],
    ["requests", "--since", "1h", "--model", "gpt-4o"],
    ["requests", "--json", "--session", FILLED.hello],
    ["stats"],
    ["stats", "--json", "--session", FILLED.story],
    ["export"],
    ["sweep", "--dry-run", "--retention", "1d"],
    ["migrate", "--list"],
]


def test_reading_commands_never_change_the_file(run: Run, db: Path, tmp_path: Path) -> None:
    digest, stat = sha256(db), db.stat()
    for argv in READING:
        code, out, err = run("--db", db, *argv)
        assert (code, err) == (0, ""), (argv, err)
        assert out
    assert run("--db", db, "export", "--output", tmp_path / "x.jsonl")[0] == 0
    assert run("--db", db, "backup", tmp_path / "b.db")[0] == 0
    assert sha256(db) == digest
    assert db.stat().st_mtime_ns == stat.st_mtime_ns
    # No -wal, -shm or journal file was created next to it either.
    assert sorted(p.name for p in db.parent.iterdir()) == ["sessions.db"]


async def test_reading_while_the_server_writes(
    aiohttp_client: AiohttpClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "live.db"
    app, store = chat_app(str(path))
    client = await aiohttp_client(app)
    await converse(client)
    await store.flush()
    assert (tmp_path / "live.db-wal").exists()  # the server has it open in WAL mode

    stop = asyncio.Event()

    async def keep_writing() -> int:
        n = 0
        while not stop.is_set():
            assert await post(client, "gpt-4o", f"busy {n}") == 200
            n += 1
        return n

    writer = asyncio.create_task(keep_writing())
    try:
        capsys.readouterr()
        for argv in (["requests", "--json", "--limit", "0"], ["stats", "--json"], ["export"]):
            code = await asyncio.to_thread(main, ["--db", str(path), *argv])
            _out, err = capsys.readouterr()
            assert (code, err) == (0, ""), err
        code = await asyncio.to_thread(main, ["--db", str(path), "backup", str(tmp_path / "b.db")])
        assert code == 0, capsys.readouterr().err
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiohttp_session_store",
            "--db",
            str(path),
            "sessions",
            "--json",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out_b, err_b = await proc.communicate()
        assert (proc.returncode, err_b) == (0, b"")
        assert len(json.loads(out_b)) >= FILLED.sessions
    finally:
        stop.set()
        written = await writer
    assert written > 0
    await store.flush()
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["--db", str(tmp_path / "b.db"), "stats", "--json"]) == 0
    backed_up = json.loads(capsys.readouterr().out)["requests"]
    assert FILLED.requests <= backed_up <= FILLED.requests + written


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["sessions", "--active", "--expired"],
        ["sessions", "--limit", "-1"],
        ["sessions", "--limit", "ten"],
        ["sessions", "--order", "id; DROP TABLE sessions"],
        ["show"],
        ["requests", "--since", "yesterday"],
        ["requests", "--until", "2026-02-30"],
        ["requests", "--session", ""],
        ["stats", "--since", "-2h"],
        ["sweep", "--retention", "0d"],
        ["sweep", "--retention", "30"],
        ["sweep", "--retention", "200000w"],
        ["export", "--bogus"],
        ["backup"],
    ],
)
def test_bad_arguments(run: Run, db: Path, argv: list[str]) -> None:
    digest = sha256(db)
    code, out, err = run("--db", db, *argv)
    assert (code, out) == (2, "")
    assert ERROR_LINE.fullmatch(err), err
    assert sha256(db) == digest


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no database at"),
        ("directory", "no database at"),
        ("text", "is not a SQLite database"),
        ("url", "unsupported database"),
        ("sqlite-two-slashes", "three slashes"),
    ],
)
def test_unusable_databases(run: Run, tmp_path: Path, setup: str, message: str) -> None:
    target: str
    if setup == "missing":
        target = str(tmp_path / "missing.db")
    elif setup == "directory":
        target = str(tmp_path)
    elif setup == "text":
        (tmp_path / "notes.txt").write_text("hello\n" * 100)
        target = str(tmp_path / "notes.txt")
    elif setup == "url":
        target = "mysql://localhost/db"
    else:
        target = "sqlite://relative.db"
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["sessions"], ["show", "x"], ["requests"], ["stats"], ["export"]):
        code, out, err = run("--db", target, *argv)
        assert (code, out) == (1, ""), argv
        assert ERROR_LINE.fullmatch(err), err
        assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_sql_injection_in_every_filter(run: Run, db: Path) -> None:
    before = rows(db)
    for payload in INJECTIONS:
        for argv in (
            ["requests", "--session", payload],
            ["requests", "--model", payload],
            ["sessions"],
        ):
            result = run_json(run, "--db", db, *argv)
            assert result == [] or argv == ["sessions"], (payload, argv)
        for argv in (["stats", "--session", payload], ["stats", "--model", payload]):
            assert run_json(run, "--db", db, *argv)["requests"] == 0
        for argv in (["export", "--session", payload], ["export", "--model", payload]):
            assert run("--db", db, *argv) == (0, "", "")
        code, _, err = run("--db", db, "show", payload)
        assert code == 1
        assert "no session" in err
        for option in ("--since", "--until"):
            assert run("--db", db, "requests", option, payload)[0] == 2
        assert run("--db", db, "sessions", "--order", payload)[0] == 2
        assert run("--db", db, "sweep", "--retention", payload)[0] == 2
    assert rows(db) == before


# -- the process boundary --------------------------------------------------------------------------


def _cli(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aiohttp_session_store", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
def test_process_exit_codes_and_one_line_errors(db: Path, tmp_path: Path) -> None:
    missing = _cli("--db", tmp_path / "missing.db", "sessions")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert ERROR_LINE.fullmatch(missing.stderr)
    assert "no database at" in missing.stderr
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    foreign = _cli("--db", text, "requests")
    assert foreign.returncode == 1
    assert ERROR_LINE.fullmatch(foreign.stderr)
    assert "not a SQLite database" in foreign.stderr
    bad = _cli("--db", db, "requests", "--since", "soon")
    assert bad.returncode == 2
    assert ERROR_LINE.fullmatch(bad.stderr)
    for result in (missing, foreign, bad):
        assert "Traceback" not in result.stderr
    ok = _cli("--db", db, "sessions", "--json")
    assert ok.returncode == 0
    assert len(json.loads(ok.stdout)) == FILLED.sessions


@pytest.mark.slow
def test_console_script(db: Path) -> None:
    script = Path(sys.executable).with_name("aiohttp-session-store")
    if not script.exists():
        pytest.skip("the console script is not installed (pip install -e .)")
    result = subprocess.run(
        [str(script), "--db", str(db), "stats", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["requests"] == FILLED.requests
    version = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert version.returncode == 0
    assert version.stdout.startswith("aiohttp-session-store 0.")


def test_help_never_shows_the_database_from_the_environment(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DB_ENV, "postgresql://admin:s3cret-pw@db.internal/store")
    code, out, _ = run("--help")
    assert code == 0
    assert DB_ENV in out
    assert "s3cret-pw" not in out


def test_help_exits_zero(run: Run) -> None:
    code, out, _ = run("--help")
    assert code == 0
    assert "sessions" in out
    assert "backup" in out
    code, out, _ = run("sweep", "--help")
    assert code == 0
    assert "--retention" in out


# -- PostgreSQL ------------------------------------------------------------------------------------


@pytest.fixture
def pg_url(pg_schema: str) -> str:
    """A filled store in a fresh schema, as a URL the CLI takes (asyncpg passes search_path on)."""
    from aiohttp_session_store.backends.postgres import PostgresBackend

    asyncio.run(fill(PostgresBackend(PG_DSN, schema=pg_schema)))
    return f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}search_path={pg_schema}"


@pytest.mark.postgres
def test_postgres_reading_commands(run: Run, pg_url: str) -> None:
    sessions = run_json(run, "--db", pg_url, "sessions")
    assert {s["id"] for s in sessions} == {FILLED.hello, FILLED.story, FILLED.fail, FILLED.crash}
    assert run("--db", pg_url, "sessions")[1].count("\n") == 1 + FILLED.sessions
    shown = run_json(run, "--db", pg_url, "show", FILLED.story)
    assert [t["response"]["reply"] for t in shown["requests"]] == ["".join(STREAM_PIECES)] * 2
    assert "    user:  Another one" in run("--db", pg_url, "show", FILLED.story)[1]
    assert len(run_json(run, "--db", pg_url, "requests", "--model", "qwen-max")) == 3
    assert len(run_json(run, "--db", pg_url, "requests", "--since", "1h")) == 7
    stats = run_json(run, "--db", pg_url, "stats")
    assert (stats["requests"], stats["tokens"]["total"]) == (7, 75)
    assert len(run("--db", pg_url, "export")[1].splitlines()) == FILLED.requests
    assert run("--db", pg_url, "migrate", "--list")[1].endswith("nothing to migrate\n")
    assert run("--db", pg_url, "migrate")[1] == f"schema version {LATEST} (already up to date)\n"
    _code, out, _ = run("--db", pg_url, "sweep", "--dry-run", "--retention", "30d")
    assert out.splitlines()[0] == "expired sessions to delete: 0"


@pytest.mark.postgres
def test_postgres_sweep_and_injection(run: Run, pg_url: str) -> None:
    for payload in INJECTIONS:
        assert run_json(run, "--db", pg_url, "requests", "--session", payload) == []
        assert run_json(run, "--db", pg_url, "requests", "--model", payload) == []
        assert run_json(run, "--db", pg_url, "stats", "--session", payload)["requests"] == 0
        assert run("--db", pg_url, "show", payload)[0] == 1
    assert len(run_json(run, "--db", pg_url, "requests")) == FILLED.requests
    code, out, _ = run("--db", pg_url, "sweep", "--retention", "30d")
    assert code == 0
    assert out.startswith("expired sessions deleted: 0\n")
    assert len(run_json(run, "--db", pg_url, "sessions")) == FILLED.sessions


@pytest.mark.postgres
def test_postgres_errors(run: Run, pg_url: str, tmp_path: Path) -> None:
    code, _, err = run("--db", pg_url, "backup", tmp_path / "b.db")
    assert code == 1
    assert ERROR_LINE.fullmatch(err)
    assert "no built-in backup" in err
    empty = f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}search_path=no_such_schema_here"
    code, _, err = run("--db", empty, "sessions")
    assert code == 1
    assert ERROR_LINE.fullmatch(err)
    assert "no session store" in err
    code, _, err = run("--db", "postgresql://postgres@127.0.0.1:1/none", "sessions")
    assert code == 1
    assert ERROR_LINE.fullmatch(err)
    assert "cannot connect" in err


# -- show: the conversation tree -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_show_draws_the_tree_of_a_conversation_driven_through_the_example_proxy(
    run: Run, kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from branched import fill_branched

    if kind == "sqlite":
        db = str(tmp_path / "proxy.db")
        recorded = asyncio.run(fill_branched(db))
    else:
        from aiohttp_session_store.backends.postgres import PostgresBackend

        schema = request.getfixturevalue("pg_schema")
        recorded = asyncio.run(fill_branched(PostgresBackend(PG_DSN, schema=schema)))
        db = f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}search_path={schema}"
    code, out, _ = run("--db", db, "show", recorded.session_id)
    assert code == 0
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("tree "))
    assert lines[start] == "tree       6 nodes, 1 branch point(s); * marks the active path"
    drawn = [re.sub(r" -> .*", "", line) for line in lines[start + 1 : start + 7]]
    assert drawn == [
        "  * #1 hi",
        "  ├─ o #2 Tell me a joke.",
        "  ├─ o #3 Tell me a joke.",
        "  │  o #4 [tool] weather in Paris",
        "  │  o #5 [tool] weather in Paris",
        "  └─ * #6 What is 2+2?",
    ]
    assert lines[start + 7] == ""
    shown = run_json(run, "--db", db, "show", recorded.session_id)
    tree = shown["tree"]
    assert [n["user_message"] for n in tree["nodes"] if n["active"]] == ["hi", "What is 2+2?"]
    assert tree["active_path"] == [n["hash"] for n in tree["nodes"] if n["active"]]
    by_hash = {n["hash"]: n for n in tree["nodes"]}
    assert len(by_hash[tree["roots"][0]]["children"]) == 3


def test_show_says_when_no_lineage_was_recorded(run: Run, db: Path) -> None:
    # The crashed call completed nothing, so it left no node.
    code, out, _ = run("--db", db, "show", FILLED.crash)
    assert code == 0
    assert "tree       - (no lineage recorded)" in out.splitlines()
    assert run_json(run, "--db", db, "show", FILLED.crash)["tree"]["nodes"] == []


def test_migrate_refuses_a_foreign_database_unless_adopted(run: Run, tmp_path: Path) -> None:
    foreign = tmp_path / "theirs.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (9.5)")
    before = foreign.read_bytes()
    code, out, err = run("--db", foreign, "migrate")
    assert code != 0
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "invoices" in err
    assert "adopt" in err
    assert foreign.read_bytes() == before  # untouched
    code, out, err = run("--db", foreign, "migrate", "--adopt")
    assert (code, err) == (0, "")
    with sqlite3.connect(foreign) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"invoices", "sessions", "requests", "responses"} <= tables
        assert conn.execute("SELECT total FROM invoices").fetchall() == [(9.5,)]


ROOT = Path(__file__).resolve().parents[1]

CRASHING_WRITER = """
import asyncio, os, signal, sys
from aiohttp_session_store import SessionManager

async def main():
    manager = await SessionManager(sys.argv[1]).open()
    await manager.create_session("crashed-session", first_user_message="left in the WAL")
    await manager.writer.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # no checkpoint, no close: -wal and -shm stay

asyncio.run(main())
"""


def test_reading_after_a_crash_changes_and_creates_no_file(run: Run, tmp_path: Path) -> None:
    db = tmp_path / "crashed.db"
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(db)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        check=False,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    assert wal.stat().st_size > 0
    assert shm.exists()

    def snapshot() -> dict[str, str]:
        return {
            p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(tmp_path.iterdir())
        }

    before = snapshot()
    sessions = run_json(run, "--db", db, "sessions")
    assert [s["id"] for s in sessions] == ["crashed-session"]  # read from the WAL
    assert snapshot() == before
    shm.unlink()  # a crash that also lost the -shm
    before = snapshot()
    sessions = run_json(run, "--db", db, "sessions")
    assert [s["id"] for s in sessions] == ["crashed-session"]
    assert snapshot() == before  # no -shm created, nothing changed
