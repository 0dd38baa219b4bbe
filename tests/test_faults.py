"""The fault-tolerance promises, each shown by a test that fails when the promise breaks.

Graceful stop and crash run the real thing: a subprocess server (tests/support/serve.py,
`web.run_app`) under load, stopped with SIGTERM or SIGKILL. Storage failures are made on
the store's own connection (query_only, max_page_count) or by another connection holding
SQLite's write lock. Disconnects, mid-stream handler failures and concurrency go through
the middleware on a real socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from aiohttp_session_store import (
    SessionStore,
    StoreConfig,
    generate_session_id,
    get_session,
    get_store,
    setup,
)
from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.models import Session

ROOT = Path(__file__).resolve().parents[1]
SERVE = ROOT / "tests" / "support" / "serve.py"
PATH = "/v1/chat/completions"
T = TypeVar("T")


def user(text: str, *history: str) -> dict[str, Any]:
    """A chat body whose first user message is `text`, continued by `history` turns."""
    messages: list[dict[str, str]] = [{"role": "user", "content": text}]
    for i, more in enumerate(history):
        messages += [
            {"role": "assistant", "content": f"reply {i}"},
            {"role": "user", "content": more},
        ]
    return {"model": "m", "messages": messages}


def rows(db: Path, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
    """Read the file as another process would (a fresh connection, after the store wrote)."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def settle(aw: Awaitable[T], seconds: float) -> tuple[bool, T | None]:
    """(finished in time, result). Callers assert outside any `except`: a failure report
    chaining asyncio's CancelledError into TimeoutError made pytest crash on CPython 3.11.7
    (SystemError: AST constructor recursion depth mismatch), hiding every result."""
    try:
        return True, await asyncio.wait_for(aw, seconds)
    except asyncio.TimeoutError:
        return False, None


async def committed(store: SessionStore, seconds: float = 5) -> None:
    done, _ = await settle(store.flush(), seconds)
    writer = store.manager.writer
    assert done, f"records not committed in {seconds}s ({writer.write_errors} failed commits)"


# --------------------------------------------------------------------------- subprocess server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Served:
    """A serve.py process and where it listens."""

    proc: asyncio.subprocess.Process
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


async def start_server(db: Path, log: Path, *args: str) -> Served:
    port = free_port()
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(SERVE),
            "--db",
            str(db),
            "--port",
            str(port),
            *args,
            stdout=out,
            stderr=out,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(served.url + "/health") as resp:
                    if resp.status == 200:
                        return served
            except aiohttp.ClientConnectionError:
                pass
            if proc.returncode is not None or time.monotonic() > deadline:
                proc.kill()
                await proc.wait()
                pytest.fail(f"serve.py did not come up:\n{served.log_text()}")
            await asyncio.sleep(0.05)


async def stop_server(served: Served, sig: signal.Signals | None = signal.SIGTERM) -> int:
    """Signal the server (None: it was signalled already) and wait for it to exit."""
    if sig is not None and served.proc.returncode is None:
        served.proc.send_signal(sig)
    done, code = await settle(served.proc.wait(), 20)
    if not done:
        served.proc.kill()
        await served.proc.wait()
        pytest.fail(f"serve.py did not stop:\n{served.log_text()}")
    assert code is not None
    return code


@dataclass
class Load:
    """What a load generator saw: when each numbered call was answered, and with what."""

    answered: dict[int, float] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)


async def fire(
    url: str,
    load: Load,
    *,
    total: int | None,
    concurrency: int = 20,
    prefix: str = "load",
    pad: tuple[int, int] | None = None,
) -> None:
    """Send numbered first messages (`{prefix} {i}`) with `concurrency` workers.

    Runs until `total` calls were made (None: until cancelled). A call counts as answered
    only when its status line arrived; connection errors (the server going away) are noted.
    `pad` (low, high): each body carries a random filler of that many bytes.
    """
    rng = random.Random(1)
    counter = iter(range(total) if total is not None else iter(int, 1))
    numbers: Iterator[int] = (i for i, _ in enumerate(counter))
    timeout = aiohttp.ClientTimeout(total=15)

    async def worker(http: aiohttp.ClientSession) -> None:
        for i in numbers:
            body = user(f"{prefix} {i}")
            if pad is not None:
                body["metadata"] = {"pad": "p" * rng.randint(*pad)}
            try:
                async with http.post(url + PATH, json=body) as resp:
                    await resp.read()
                    load.statuses[i] = resp.status
                    load.answered[i] = time.monotonic()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                load.failed.add(i)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        await asyncio.gather(*(worker(http) for _ in range(concurrency)))


def recorded_numbers(db: Path, prefix: str = "load") -> tuple[dict[int, int], set[int]]:
    """({call number: response rows}, call numbers with a request row) from the file."""
    requests = rows(db, "SELECT request_id, openai_request FROM requests")
    number_of: dict[str, int] = {}
    for row in requests:
        text = json.loads(row["openai_request"])["messages"][0]["content"]
        if text.startswith(prefix + " "):
            number_of[row["request_id"]] = int(text.split()[-1])
    responses: dict[int, int] = {}
    for row in rows(db, "SELECT request_id FROM responses"):
        n = number_of.get(row["request_id"])
        if n is not None:
            responses[n] = responses.get(n, 0) + 1
    return responses, set(number_of.values())


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.mark.slow
async def test_sigterm_under_load_commits_every_answered_call(tmp_path: Path) -> None:
    db, log = tmp_path / "sessions.db", tmp_path / "server.log"
    served = await start_server(db, log)
    async with (
        aiohttp.ClientSession() as http,
        http.post(served.url + PATH, json=user("remember me")) as resp,
    ):
        first = await resp.json()
    assert first["is_new"] is True

    load = Load()
    firing = asyncio.create_task(fire(served.url, load, total=320))
    # Signal in the thick of it: 200 answered, about 20 in flight, more still to send.
    await wait_until(lambda: len(load.answered) >= 200, 20, "200 answered calls")
    served.proc.send_signal(signal.SIGTERM)
    await firing
    # Not signalled twice: run_app unregisters its handlers while it shuts down.
    code = await stop_server(served, None)
    assert code == 0, served.log_text()

    answered = {i for i, status in load.statuses.items() if status == 200}
    assert len(answered) >= 200
    assert set(load.statuses) == answered, "every answered call was a 200"
    responses, requested = recorded_numbers(db)
    assert answered - requested == set(), "answered calls with no request row"
    assert {n for n, count in responses.items() if count == 1} == answered
    # Nothing recorded that the client was not answered, and no call recorded twice.
    assert requested == answered
    assert all(count == 1 for count in responses.values())
    ((n_req, n_resp),) = rows(db, "SELECT (SELECT count(*) FROM requests), count(*) FROM responses")
    assert n_req == n_resp == len(answered) + 1  # + the "remember me" call

    # Restarted on the same file, the conversation goes on where it was.
    served = await start_server(db, log)
    try:
        async with aiohttp.ClientSession() as http:
            body = user("remember me", "and now?")
            async with http.post(served.url + PATH, json=body) as resp:
                again = await resp.json()
    finally:
        assert await stop_server(served) == 0, served.log_text()
    assert again == {
        "session_id": first["session_id"],
        "is_new": False,
        "parent_id": "parent-1",
        "message_count": 1,
    }


@pytest.mark.slow
async def test_kill_9_under_load_leaves_a_sound_database(tmp_path: Path) -> None:
    db, log = tmp_path / "sessions.db", tmp_path / "server.log"
    served = await start_server(db, log, "--flush-interval", "0.05")
    load = Load()
    started = time.monotonic()
    firing = asyncio.create_task(fire(served.url, load, total=None))
    try:
        # Long enough that the last 0.5 s is a minority of what was answered.
        await wait_until(
            lambda: time.monotonic() - started >= 1.5 and len(load.answered) >= 200,
            20,
            "1.5 s of load and 200 answered calls",
        )
        killed_at = time.monotonic()
        served.proc.kill()
        await served.proc.wait()
        # Let the in-flight calls fail, then stop sending.
        await asyncio.sleep(0.1)
    finally:
        firing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await firing

    assert rows(db, "PRAGMA integrity_check")[0][0] == "ok"
    assert rows(db, "PRAGMA foreign_key_check") == []
    answered = {i for i, t in load.answered.items() if t <= killed_at}
    responses, requested = recorded_numbers(db)
    missing = answered - set(responses)
    # The promise is "at most the last flush_interval (0.05 s) of records": a record is
    # committed within flush_interval of being handed over, and a call's response record
    # is handed over before its reply is sent. Measured from the client side, the window
    # also holds the commit itself, scheduling and the signal's delivery, so the test
    # allows 0.5 s: a writer that lost older records (or never committed) still fails.
    recent = {i for i in answered if load.answered[i] >= killed_at - 0.5}
    assert len(recent) < len(answered) / 2, "the load was too short for the bound to mean much"
    assert missing <= recent, f"lost records of calls answered >0.5 s before the kill: {missing}"

    assert set(responses) <= requested
    assert all(count == 1 for count in responses.values())

    # It opens and serves on restart, and the call is recorded.
    served = await start_server(db, log)
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.post(served.url + PATH, json=user("after the crash")) as resp,
        ):
            assert resp.status == 200
            assert (await resp.json())["is_new"] is True
    finally:
        assert await stop_server(served) == 0, served.log_text()
    assert rows(db, "PRAGMA integrity_check")[0][0] == "ok"
    found = rows(
        db,
        "SELECT count(*) FROM requests q JOIN responses r USING (request_id)"
        " WHERE json_extract(q.openai_request, '$.messages[0].content') = ?",
        ("after the crash",),
    )
    assert found[0][0] == 1


@pytest.mark.slow
async def test_kill_9_loss_window_with_24_clients_and_large_bodies(tmp_path: Path) -> None:
    """The README's measured bound: 24 clients, bodies of 16-64 KiB, kill -9 mid-load."""
    db, log = tmp_path / "sessions.db", tmp_path / "server.log"
    served = await start_server(db, log, "--flush-interval", "0.05")
    load = Load()
    started = time.monotonic()
    firing = asyncio.create_task(
        fire(served.url, load, total=None, concurrency=24, pad=(16 * 1024, 64 * 1024))
    )
    try:
        await wait_until(
            lambda: time.monotonic() - started >= 2.0 and len(load.answered) >= 200,
            30,
            "2 s of load and 200 answered calls",
        )
        killed_at = time.monotonic()
        served.proc.kill()
        await served.proc.wait()
        await asyncio.sleep(0.1)
    finally:
        firing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await firing

    assert rows(db, "PRAGMA integrity_check")[0][0] == "ok"
    answered = {i for i, t in load.answered.items() if t <= killed_at}
    responses, _ = recorded_numbers(db)
    missing = answered - set(responses)
    window = max((killed_at - load.answered[i] for i in missing), default=0.0)
    print(
        f"\nkill -9: {len(answered)} answered, {len(missing)} lost, oldest {window * 1000:.0f} ms"
    )
    # Measured on a loaded 2-core machine: at most ~0.2 s (see the README). The assertion
    # allows for a noisy neighbour; the writer it guards against lost calls 0.15-0.65 s old.
    assert window <= 0.5, f"lost calls answered up to {window * 1000:.0f} ms before the kill"


# --------------------------------------------------------------------------- in-process apps

Client = TestClient[web.Request, web.Application]


async def turn(request: web.Request) -> web.Response:
    """Counts a turn in the resolved session, like a proxy that got the upstream's reply."""
    session = get_session(request)
    if session is None:
        return web.json_response({"session_id": None})
    await get_store(request).manager.update_session(session.id, f"parent-{id(request)}")
    return web.json_response({"session_id": session.id, "is_new": session.is_new})


async def start_app(
    aiohttp_client: AiohttpClient,
    database: Backend | Path,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]] = turn,
    **config: Any,
) -> tuple[Client, SessionStore]:
    app = web.Application()
    store = setup(app, database, config=StoreConfig(**config))
    app.router.add_post(PATH, handler)
    return await aiohttp_client(app), store


async def post_all(client: Client, bodies: list[dict[str, Any]], timeout: float = 15) -> list[int]:
    """Send every body at once; the statuses, in order."""

    async def one(body: dict[str, Any]) -> int:
        async with client.post(PATH, json=body) as resp:
            await resp.read()
            return resp.status

    _, statuses = await settle(asyncio.gather(*(one(b) for b in bodies)), timeout)
    assert statuses is not None, f"{len(bodies)} calls not all answered within {timeout}s"
    return list(statuses)


# --------------------------------------------------------------------------- storage failures


class FaultySQLite(SQLiteBackend):
    """SQLite whose own connection can be made read-only or full, and whose reads can fail.

    `chmod` does not stop root, so read-only is SQLite's `query_only` and a full disk is
    `max_page_count`, both set on the store's own connection.
    """

    fail_reads = False

    async def pragma(self, statement: str) -> list[Any]:
        # Under the backend's lock, so it never lands inside the writer's transaction.
        async with self._lock:
            return list(await self._conn().execute_fetchall(statement))

    async def get_session(self, session_id: str) -> Session | None:
        if self.fail_reads:
            raise sqlite3.OperationalError("disk I/O error")
        return await super().get_session(session_id)


FAILURES = ["read_only", "disk_full", "locked"]


@asynccontextmanager
async def failing(kind: str, backend: FaultySQLite, db: Path) -> AsyncIterator[None]:
    """Storage fails with `kind` inside the block and recovers when it ends."""
    if kind == "read_only":
        await backend.pragma("PRAGMA query_only=ON")
        try:
            yield
        finally:
            await backend.pragma("PRAGMA query_only=OFF")
    elif kind == "disk_full":
        ((pages,),) = await backend.pragma("PRAGMA page_count")
        await backend.pragma(f"PRAGMA max_page_count={pages}")
        try:
            yield
        finally:
            await backend.pragma("PRAGMA max_page_count=1073741823")
    else:
        # Another process holding the write lock; the store's busy_timeout is 0.05 s.
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()


# Big enough that a disk-full database needs new pages for every few records.
PAD = "x" * 2000


def burst(tag: str, n: int) -> list[dict[str, Any]]:
    return [user(f"{tag} {i} {PAD}") for i in range(n)]


async def faulty_app(
    aiohttp_client: AiohttpClient, db: Path, **config: Any
) -> tuple[Client, SessionStore, FaultySQLite]:
    backend = FaultySQLite(db, busy_timeout=0.05)
    config = {"max_pending_records": 30, "flush_interval": 0.01, **config}
    client, store = await start_app(aiohttp_client, backend, **config)
    assert await post_all(client, [user("warm up")]) == [200]
    await store.flush()
    return client, store, backend


def count_like(db: Path, table: str, pattern: str) -> int:
    sql = {
        "requests": "SELECT count(*) FROM requests WHERE openai_request LIKE ?",
        "responses": "SELECT count(*) FROM responses r JOIN requests q USING (request_id)"
        " WHERE q.openai_request LIKE ?",
    }[table]
    return int(rows(db, sql, (pattern,))[0][0])


@pytest.mark.parametrize("kind", FAILURES)
async def test_storage_failure_keeps_serving_bounds_memory_and_recovers(
    aiohttp_client: AiohttpClient, db_path: Path, kind: str
) -> None:
    client, store, backend = await faulty_app(aiohttp_client, db_path)
    writer = store.manager.writer
    async with failing(kind, backend, db_path):
        # Every call is served while nothing can be written.
        assert await post_all(client, burst("during", 100)) == [200] * 100
        await asyncio.sleep(0.1)  # the writer retries meanwhile
        assert writer.write_errors > 0
        # 100 calls hand over 200 records and 100 sessions; the queue holds at most 30
        # (plus the one batch being retried), the rest are dropped and counted.
        assert writer.pending <= 30
        assert writer.records_dropped >= 100
        assert await post_all(client, burst("still", 20)) == [200] * 20
        assert writer.pending <= 30
    await committed(store)

    _, metrics = await settle(store.manager.get_metrics(), 5)
    assert metrics is not None
    assert metrics["write_errors"] == writer.write_errors > 0
    assert metrics["records_dropped"] == writer.records_dropped > 0
    assert metrics["records_pending"] == 0
    # What was held through the failure was committed once storage came back...
    assert 0 < count_like(db_path, "requests", "%during%") <= 60
    # ...and new calls are recorded again, request and response.
    assert await post_all(client, [user("after recovery")]) == [200]
    await committed(store)
    assert count_like(db_path, "requests", "%after recovery%") == 1
    assert count_like(db_path, "responses", "%after recovery%") == 1
    assert rows(db_path, "PRAGMA foreign_key_check") == []


@pytest.mark.parametrize("kind", FAILURES)
async def test_storage_failure_is_logged_once_per_burst(
    aiohttp_client: AiohttpClient,
    db_path: Path,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, store, backend = await faulty_app(aiohttp_client, db_path)
    caplog.set_level(logging.WARNING, logger="aiohttp_session_store")
    async with failing(kind, backend, db_path):
        assert await post_all(client, burst("during", 100)) == [200] * 100
        await asyncio.sleep(0.1)
        during = [r for r in caplog.records if r.name.startswith("aiohttp_session_store")]
    await committed(store)
    after = [r for r in caplog.records if r.name.startswith("aiohttp_session_store")]
    messages = [r.getMessage() for r in during]
    # One error for the burst, not one per call (100 calls here). Lines about dropping: one
    # per overflow, and a full disk may let a first batch in before failing, so two.
    assert sum(r.levelno == logging.ERROR for r in during) == 1, messages
    assert len(during) <= 3, f"{len(during)} log lines for one burst: {messages[:5]}"
    recovered = [r for r in after[len(during) :] if "recovered" in r.getMessage()]
    assert len(recovered) == 1

    # A second burst is a new burst: logged once more.
    async with failing(kind, backend, db_path):
        assert await post_all(client, burst("again", 5)) == [200] * 5
        await asyncio.sleep(0.1)
    await committed(store)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2


async def test_get_metrics_answers_while_storage_fails(
    aiohttp_client: AiohttpClient, db_path: Path
) -> None:
    # Metrics are how an operator sees a failing disk: they must not wait for it to recover.
    client, store, backend = await faulty_app(aiohttp_client, db_path)
    async with failing("locked", backend, db_path):
        assert await post_all(client, burst("during", 50)) == [200] * 50
        await asyncio.sleep(0.1)
        _, metrics = await settle(store.manager.get_metrics(), 2)
    assert metrics is not None, "get_metrics() blocked while storage was failing"
    assert metrics["write_errors"] > 0
    assert metrics["records_dropped"] > 0


async def advancing(request: web.Request) -> web.StreamResponse:
    """A stateful-proxy-like handler: sets a chat id and advances the session."""
    session = get_session(request)
    if session is not None:
        manager = get_store(request).manager
        await manager.set_chat_id(session.id, "chat-1")
        await manager.update_parent_id(session.id, "parent-1")
    return web.json_response({"ok": True})


async def streaming(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in ("a", "b"):
        chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write(b"data: [DONE]\n\n")
    return response


async def test_sync_durability_waits_once_per_call_then_answers_503(
    aiohttp_client: AiohttpClient, db_path: Path
) -> None:
    # Five commit points (session, request, set_chat_id, update_parent_id, response): the
    # call waits once, at most sync_commit_timeout in all, then answers 503 + Retry-After.
    backend = FaultySQLite(db_path, busy_timeout=0.05)
    client, store = await start_app(
        aiohttp_client,
        backend,
        advancing,
        durability="sync",
        sync_commit_timeout=0.4,
        flush_interval=0.01,
    )
    async with failing("locked", backend, db_path):
        started = time.monotonic()
        async with client.post(PATH, json=user("new while locked")) as resp:
            status, retry_after = resp.status, resp.headers.get("Retry-After")
            body = await resp.json()
        elapsed = time.monotonic() - started
    assert (status, retry_after) == (503, "1")
    assert body["error"]["type"] == "server_error"
    assert elapsed < 2 * 0.4 + 0.5, f"waited {elapsed:.2f}s: more than one bounded wait"
    await committed(store)
    # Once storage recovered, the call's rows say what the client was told.
    (row,) = rows(db_path, "SELECT status_code, outcome, error FROM responses")
    assert (row["status_code"], row["outcome"]) == (503, "handler_error")
    assert "not committed" in row["error"]
    # And a call while storage works is a 200, committed before it returns.
    async with client.post(PATH, json=user("after recovery")) as resp:
        assert resp.status == 200
    assert len(rows(db_path, "SELECT 1 FROM responses")) == 2


async def test_sync_stream_not_committed_before_its_end_says_so(
    aiohttp_client: AiohttpClient, db_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FaultySQLite(db_path, busy_timeout=0.05)
    client, store = await start_app(
        aiohttp_client,
        backend,
        streaming,
        durability="sync",
        sync_commit_timeout=0.3,
        flush_interval=0.01,
    )
    async with (
        failing("locked", backend, db_path),
        client.post(PATH, json={"model": "m", "messages": []}) as resp,
    ):
        assert resp.status == 200  # its status went out before any commit could fail
        assert b"[DONE]" in await resp.read()
    await committed(store)
    (row,) = rows(db_path, "SELECT outcome, error FROM responses")
    assert row["outcome"] == "completed"
    assert "before its records were committed" in row["error"]
    assert any("before its records were committed" in r.message for r in caplog.records)


async def test_session_resolution_failure_is_a_recorded_503(
    aiohttp_client: AiohttpClient, db_path: Path
) -> None:
    client, store, backend = await faulty_app(aiohttp_client, db_path)
    backend.fail_reads = True
    # A new first message needs the database (cache miss): 503, retry in a second.
    async with client.post(PATH, json=user("cannot resolve")) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        error = (await resp.json())["error"]
    assert error["type"] == "server_error"
    assert "unavailable" in error["message"]
    # A session already in memory is still served while reads fail.
    assert await post_all(client, [user("warm up", "next")]) == [200]
    backend.fail_reads = False
    await store.flush()

    (row,) = rows(
        db_path,
        "SELECT q.session_id, r.status_code, r.error FROM requests q JOIN responses r"
        " USING (request_id) WHERE q.openai_request LIKE '%cannot resolve%'",
    )
    # Recorded under the id it could not resolve, so the failed call is found with its session.
    assert row["session_id"] == generate_session_id("cannot resolve")
    assert row["status_code"] == 503
    assert "unavailable" in row["error"]
    # The retry it asked for works.
    async with client.post(PATH, json=user("cannot resolve")) as resp:
        assert resp.status == 200
        assert (await resp.json())["is_new"] is True


# --------------------------------------------------------------------------- disconnects

WORDS = [f"w{i} " for i in range(40)]
FULL_REPLY = "".join(WORDS)
STYLE = web.AppKey("style", str)


def sse_chunk(content: str | None, finish: str | None = None) -> bytes:
    delta = {} if content is None else {"content": content}
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(chunk)}\n\n".encode()


async def stream_words(request: web.Request) -> web.StreamResponse:
    """Streams WORDS slowly; on a disconnect it raises, or (style "swallows") returns."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        for word in WORDS:
            await response.write(sse_chunk(word))
            await asyncio.sleep(0.003)
        await response.write(sse_chunk(None, "stop") + b"data: [DONE]\n\n")
    except ConnectionResetError:
        if request.app[STYLE] == "swallows":
            return response
        raise
    await response.write_eof()
    return response


@asynccontextmanager
async def serve(app: web.Application, *, cancellation: bool) -> AsyncIterator[str]:
    """The app on a real socket; `handler_cancellation` as run_app would be given it."""
    runner = web.AppRunner(app, handler_cancellation=cancellation, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def read_then_leave(http: aiohttp.ClientSession, url: str, k: int) -> str:
    """Open a stream, read `k` events, drop the connection; the content received."""
    received: list[str] = []
    resp = await http.post(url + PATH, json=user(f"disconnect {k}"))
    try:
        assert resp.status == 200
        while len(received) < k:
            line = await resp.content.readline()
            if line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                received.append(delta.get("content", ""))
    finally:
        resp.close()  # closes the connection, not just this response
    return "".join(received)


def stored_content(openai_response: str) -> str:
    completion = json.loads(openai_response)
    content: str = completion["choices"][0]["message"].get("content") or ""
    return content


# (handler_cancellation, what the handler does when the client is gone)
STYLES = {
    "cancelled": (True, "raises"),
    "raises": (False, "raises"),
    "swallows": (False, "swallows"),
}


@pytest.mark.parametrize("style", list(STYLES))
async def test_disconnect_at_20_random_points_leaves_one_prefix_row_each(
    db_path: Path, style: str
) -> None:
    cancellation, behaviour = STYLES[style]
    app = web.Application()
    app[STYLE] = behaviour
    store = setup(app, db_path)
    app.router.add_post(PATH, stream_words)
    points = random.Random(f"disconnect-{style}").sample(range(30), 20)
    async with serve(app, cancellation=cancellation) as url:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            received = await asyncio.gather(*(read_then_leave(http, url, k) for k in points))

        def settled() -> bool:
            return int(rows(db_path, "SELECT count(*) FROM responses")[0][0]) >= len(points)

        # The handlers notice the disconnects asynchronously.
        deadline = time.monotonic() + 5
        while True:
            await store.flush()
            if settled() or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        await store.flush()

    for k, got in zip(points, received, strict=True):
        found = rows(
            db_path,
            "SELECT r.outcome, r.status_code, r.openai_response, r.error FROM requests q"
            " JOIN responses r USING (request_id) WHERE q.openai_request LIKE ?",
            (f'%"disconnect {k}"%',),
        )
        assert len(found) == 1, f"point {k}: {len(found)} response rows"
        (row,) = found
        assert row["outcome"] == "client_disconnected", (k, row["outcome"], row["error"])
        assert row["status_code"] == 200
        content = stored_content(row["openai_response"])
        # Everything the client got, nothing that was never sent, never the whole reply.
        assert content.startswith(got), (k, got, content)
        assert FULL_REPLY.startswith(content), (k, content)
        assert content != FULL_REPLY
    ((n_req, n_resp),) = rows(
        db_path, "SELECT (SELECT count(*) FROM requests), count(*) FROM responses"
    )
    assert n_req == n_resp == len(points)


async def test_handler_failing_mid_stream_is_a_handler_error_with_what_was_sent(
    aiohttp_client: AiohttpClient, db_path: Path
) -> None:
    async def breaks_after_five(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in WORDS[:5]:
            await response.write(sse_chunk(word))
        raise RuntimeError("upstream parser blew up")

    client, store = await start_app(aiohttp_client, db_path, breaks_after_five)
    received = bytearray()

    async def read_all() -> None:
        async with client.post(PATH, json=user("tell me a story")) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                received.extend(chunk)

    # The stream ends without its last chunk: the client sees a broken transfer.
    with pytest.raises(aiohttp.ClientPayloadError):
        await read_all()
    assert received.count(b"data: ") == 5
    await store.flush()
    (row,) = rows(db_path, "SELECT outcome, status_code, openai_response, error FROM responses")
    assert row["outcome"] == "handler_error"
    assert row["status_code"] == 200
    assert row["error"] == "RuntimeError: upstream parser blew up"
    assert stored_content(row["openai_response"]) == "".join(WORDS[:5])
    # The middleware re-raised it: the server stays up and serves the next call.
    async with client.post(PATH, json=user("again")) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("cancellation", [True, False], ids=["cancelled", "run_app_default"])
async def test_client_leaving_mid_upload_still_leaves_one_row_pair(
    db_path: Path, cancellation: bool
) -> None:
    # The call is on a session path, so it is recorded even though its body never
    # arrived: a request row (no body) and a client_disconnected response row. Without
    # handler cancellation (run_app's default) the body read fails instead of being cancelled.
    app = web.Application()
    store = setup(app, db_path)
    app.router.add_post(PATH, turn)
    async with serve(app, cancellation=cancellation) as url:
        host, port = url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {PATH} HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n".encode()
            + b'{"messages": [{"role": "user", "content": "cut'
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.1)
        await store.flush()
    ((n_req, n_resp),) = rows(
        db_path, "SELECT (SELECT count(*) FROM requests), count(*) FROM responses"
    )
    assert (n_req, n_resp) == (1, 1)
    (row,) = rows(db_path, "SELECT outcome FROM responses")
    assert row["outcome"] == "client_disconnected"


# The example proxy's `upstream_error` for a stream its upstream breaks mid-reply
# ([fail-mid]) is tested through the example itself, in both modes:
# tests/test_proxy_server.py::test_stream_broken_mid_reply.


# --------------------------------------------------------------------------- concurrency


async def test_50_concurrent_first_requests_make_one_session(
    aiohttp_client: AiohttpClient, backend_factory: Callable[..., Backend]
) -> None:
    client, store = await start_app(aiohttp_client, backend_factory())
    bodies = [user("the same opening words")] * 50

    async def one(body: dict[str, Any]) -> dict[str, Any]:
        async with client.post(PATH, json=body) as resp:
            assert resp.status == 200
            reply: dict[str, Any] = await resp.json()
            return reply

    _, replies = await settle(asyncio.gather(*(one(b) for b in bodies)), 15)
    assert replies is not None
    assert len({r["session_id"] for r in replies}) == 1
    assert sum(r["is_new"] for r in replies) == 1  # one call created it, 49 found it
    await store.flush()
    assert await store.backend.count_sessions() == 1
    session = await store.backend.get_session(replies[0]["session_id"])
    assert session is not None
    assert session.message_count == 50


async def test_100_concurrent_turns_count_exactly(
    aiohttp_client: AiohttpClient, backend_factory: Callable[..., Backend]
) -> None:
    client, store = await start_app(aiohttp_client, backend_factory())
    assert await post_all(client, [user("a long conversation")]) == [200]
    turns = [user("a long conversation", f"turn {i}") for i in range(100)]
    assert await post_all(client, turns) == [200] * 100
    await store.flush()
    (session_id,) = await store.manager.get_active_sessions()
    stored = await store.backend.get_session(session_id)
    assert stored is not None
    assert stored.message_count == 101
    assert await store.backend.count_sessions() == 1
