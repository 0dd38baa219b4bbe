"""The example proxy through a PostgreSQL outage: 503 + Retry-After, never a raw driver
error or a 500; started while the database is down, it serves once it is back, unrestarted.

The outage is real: a TCP relay in front of the test server, cut and restored.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import PG_DSN
from pytest_aiohttp import AiohttpServer
from test_backends_outage import Relay

from aiohttp_session_store import StoreConfig, get_store

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = str(ROOT / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import fake_upstream  # noqa: E402
import proxy_server  # noqa: E402

pytestmark = pytest.mark.postgres

BODY = {"model": "qwen-fake", "messages": [{"role": "user", "content": "hello"}]}


# Tests take `relay` before `aiohttp_server`: fixtures are torn down in reverse, so the
# proxies shut down while the database is still reachable. The other way round each
# shutdown waits out its `shutdown_timeout` (10 s) for a database that is gone.
@pytest.fixture
async def relay(pg_schema: str) -> AsyncIterator[tuple[Relay, str]]:
    import asyncpg

    conn = await asyncpg.connect(PG_DSN)
    try:
        await conn.execute(f'CREATE SCHEMA "{pg_schema}"')
    finally:
        await conn.close()
    r = Relay()
    await r.start()
    try:
        yield r, f"postgresql://postgres@127.0.0.1:{r.port}/test?search_path={pg_schema}"
    finally:
        await r.cut()


async def proxy(aiohttp_server: AiohttpServer, dsn: str) -> tuple[TestServer, str]:
    upstream = await aiohttp_server(fake_upstream.create_app())
    app = proxy_server.create_app(
        db=dsn,
        upstream=str(upstream.make_url("")).rstrip("/"),
        mode="stateful",
        config=StoreConfig(flush_interval=0.01),
    )
    server = await aiohttp_server(app)
    return server, str(server.make_url("")).rstrip("/")


async def post(root: str, body: dict[str, Any] = BODY) -> tuple[int, dict[str, Any], str | None]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(root + "/v1/chat/completions", json=body) as resp,
    ):
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


async def health(root: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(root + "/health") as resp:
        await resp.read()
        return resp.status


async def eventually_status(root: str, want: int, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (status := (await post(root))[0]) != want:
        assert loop.time() < deadline, f"still {status}, wanted {want}"
        await asyncio.sleep(0.05)


async def test_started_while_the_database_is_down(
    relay: tuple[Relay, str], aiohttp_server: AiohttpServer
) -> None:
    r, dsn = relay
    await r.cut()
    server, root = await proxy(aiohttp_server, dsn)  # starts anyway
    assert not get_store(server.app).ready
    status, body, retry_after = await post(root)
    assert (status, retry_after) == (503, "1")
    assert "session store" in body["error"]["message"]
    assert await health(root) == 503
    await r.restore()
    await eventually_status(root, 200)  # no restart
    assert await health(root) == 200
    assert get_store(server.app).ready


async def test_an_outage_mid_conversation_is_a_503_then_heals(
    relay: tuple[Relay, str], aiohttp_server: AiohttpServer
) -> None:
    r, dsn = relay
    _server, root = await proxy(aiohttp_server, dsn)
    status, first, _ = await post(root)
    assert status == 200
    history = [
        *BODY["messages"],
        first["choices"][0]["message"],
        {"role": "user", "content": "and then?"},
    ]
    await r.cut()
    statuses = set()
    for _ in range(5):
        status, body, retry_after = await post(root, {**BODY, "messages": history})
        statuses.add(status)
        if status == 503:
            assert retry_after == "1"
            assert body["error"]["type"] == "server_error"
    assert statuses <= {200, 503}  # never a 500 from a raw driver error
    assert 503 in statuses
    assert await health(root) == 503
    await r.restore()
    await eventually_status(root, 200)
    status, body, _ = await post(root, {**BODY, "messages": history})
    assert status == 200
    assert "Earlier you said" in body["choices"][0]["message"]["content"]
