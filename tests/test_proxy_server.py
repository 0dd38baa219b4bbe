"""End to end: the official openai client → examples/proxy_server.py → examples/fake_upstream.py.

Each test starts the fake upstream and the proxy on real sockets (pytest-aiohttp's
`aiohttp_server`), talks to the proxy with `openai.AsyncOpenAI` (or aiohttp where the test
needs control over the connection), and checks what the upstream saw and what was recorded
in the SQLite file.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai import AsyncStream
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam
from proxy_apps import poll
from pytest_aiohttp import AiohttpServer

from aiohttp_session_store import SessionStore, StoreConfig, get_store

# The examples are scripts, not a package: import them the way `python examples/x.py` does.
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = str(ROOT / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import fake_upstream  # noqa: E402
import proxy_server  # noqa: E402

UPSTREAM_KEY = "upstream-secret"
MODES = ["stateful", "openai"]
QUESTIONS = ["Hello, I am Ada.", "What is 2+2?", "And what did I say first?"]


@dataclass
class Proxy:
    app: web.Application
    root: str  # http://127.0.0.1:PORT
    store: SessionStore
    db: Path
    mode: str

    def url(self, path: str) -> str:
        return self.root + path

    @property
    def base_url(self) -> str:
        return self.url("/v1")

    def client(self, api_key: str = "client-key") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)

    async def rows(self, table: str, order: str = "id") -> list[dict[str, Any]]:
        """Every row of `table`, once everything queued is committed."""
        await self.store.flush()
        with sqlite3.connect(self.db) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY {order}")]


ProxyFactory = Callable[..., Awaitable[Proxy]]
Messages = list[ChatCompletionMessageParam]


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(fake_upstream.create_app(api_key=UPSTREAM_KEY))


@pytest.fixture
async def make_proxy(aiohttp_server: AiohttpServer, tmp_path: Path) -> AsyncIterator[ProxyFactory]:
    runners: list[web.AppRunner] = []

    async def make(
        mode: str,
        upstream: str | None,
        upstream_key: str | None = UPSTREAM_KEY,
        *,
        handler_cancellation: bool = True,
    ) -> Proxy:
        db = tmp_path / "sessions.db"
        app = proxy_server.create_app(
            db=db,
            upstream=upstream,
            upstream_key=upstream_key,
            mode=mode,  # type: ignore[arg-type]
            config=StoreConfig(flush_interval=0.01),
        )
        if handler_cancellation:  # what aiohttp's TestServer always does
            server = await aiohttp_server(app)
            root = str(server.make_url("")).rstrip("/")
        else:  # what web.run_app does by default: a handler outlives its client
            runner = web.AppRunner(app, handler_cancellation=False)
            await runner.setup()
            runners.append(runner)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            root = f"http://{host}:{port}"
        return Proxy(app=app, root=root, store=get_store(app), db=db, mode=mode)

    yield make
    for runner in runners:
        await runner.cleanup()


def upstream_url(upstream: TestServer, mode: str) -> str:
    # The openai mode takes a base URL as the openai client does (with /v1).
    base = str(upstream.make_url("")).rstrip("/")
    return base + "/v1" if mode == "openai" else base


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stored_content(response_row: dict[str, Any]) -> str:
    content: str = json.loads(response_row["openai_response"])["choices"][0]["message"]["content"]
    return content


async def ask(
    client: openai.AsyncOpenAI, messages: Messages, *, stream: bool
) -> tuple[str, dict[str, int] | None]:
    """One turn through the openai client: (content, usage)."""
    if not stream:
        completion = await client.chat.completions.create(
            model="qwen-fake",
            messages=messages,
        )
        assert completion.object == "chat.completion"
        assert completion.choices[0].finish_reason == "stop"
        usage = completion.usage.model_dump() if completion.usage else None
        return completion.choices[0].message.content or "", usage
    parts: list[str] = []
    usage = None
    finish_reasons = []
    chunks = await client.chat.completions.create(
        model="qwen-fake",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in chunks:
        assert chunk.object == "chat.completion.chunk"
        assert chunk.id.startswith("chatcmpl-")
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert finish_reasons == ["stop"]
    return "".join(parts), usage


async def collect(chunks: AsyncStream[ChatCompletionChunk], parts: list[str]) -> None:
    """Read a stream's content into `parts`, so what came before an error is kept."""
    async for chunk in chunks:
        parts.extend(c.delta.content or "" for c in chunk.choices)


# --------------------------------------------------------------------------- conversations


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("mode", MODES)
async def test_three_turn_conversation(
    make_proxy: ProxyFactory, upstream: TestServer, mode: str, stream: bool
) -> None:
    proxy = await make_proxy(mode, upstream_url(upstream, mode))
    messages: Messages = [{"role": "system", "content": "You are terse."}]
    received: list[str] = []
    async with proxy.client() as client:
        for question in QUESTIONS:
            # As OpenAI clients do: the whole history every turn.
            messages.append({"role": "user", "content": question})
            content, usage = await ask(client, messages, stream=stream)
            assert usage is not None
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
            received.append(content)
            messages.append({"role": "assistant", "content": content})

    # One session, three turns.
    sessions = await proxy.rows("sessions")
    assert len(sessions) == 1
    session = sessions[0]
    assert session["message_count"] == 3
    assert session["first_user_message"] == QUESTIONS[0]

    # The client received exactly what was recorded, turn by turn.
    requests = await proxy.rows("requests")
    responses = await proxy.rows("responses")
    assert len(requests) == len(responses) == 3
    by_request = {r["request_id"]: r for r in responses}
    for request, content in zip(requests, received, strict=True):
        response = by_request[request["request_id"]]
        assert request["session_id"] == response["session_id"] == session["id"]
        assert request["stream"] == int(stream)
        assert response["outcome"] == "completed"
        assert response["status_code"] == 200
        assert response["finish_reason"] == "stop"
        assert stored_content(response) == content

    if mode == "stateful":
        # The upstream got one chat: the whole history first (system message included),
        # then only the new message each turn, under the right parents.
        calls = upstream.app[fake_upstream.CALLS]
        assert [c.message for c in calls] == QUESTIONS
        assert len(upstream.app[fake_upstream.CHATS]) == 1
        assert {c.chat_id for c in calls} == {session["chat_id"]}
        assert [c.parent_id for c in calls] == [
            None,
            calls[0].new_parent_id,
            calls[1].new_parent_id,
        ]
        assert all(c.status == 200 and c.finished and c.stream == stream for c in calls)
        assert session["parent_id"] == calls[2].new_parent_id
        # Each turn's record holds the upstream request and the parent that turn produced.
        for index, (request, response, call) in enumerate(
            zip(requests, responses, calls, strict=True)
        ):
            sent = json.loads(request["upstream_request"])
            assert sent["parent_id"] == call.parent_id
            expected = ["You are terse.", call.message] if index == 0 else [call.message]
            assert [m["content"] for m in sent["messages"]] == expected
            assert response["parent_id"] == call.new_parent_id
            assert response["upstream_response"]
        # And the upstream held the context: its reply shows it.
        assert received[2] == (
            f'Turn 3 of chat {session["chat_id"]}: you said "{QUESTIONS[2]}". '
            f'Earlier you said: "{QUESTIONS[0]}", "{QUESTIONS[1]}". '
            'My instructions: "You are terse.".'
        )
    else:
        # Forwarded as is: the whole history every turn, with the proxy's upstream key.
        bodies = upstream.app[fake_upstream.OPENAI_CALLS]
        assert [len(b["messages"]) for b in bodies] == [2, 4, 6]
        assert [b.get("stream", False) for b in bodies] == [stream] * 3
        assert received[2] == f'You sent 6 messages. Your last message was: "{QUESTIONS[2]}".'
        assert upstream.app[fake_upstream.CALLS] == []


async def test_offline_default_uses_in_process_fake(make_proxy: ProxyFactory) -> None:
    proxy = await make_proxy("stateful", None, None)
    fake = proxy.app[proxy_server.FAKE_UPSTREAM]
    async with aiohttp.ClientSession() as http, http.get(proxy.url("/health")) as resp:
        health = await resp.json()
    assert health["status"] == "ok"
    assert health["mode"] == "stateful"
    assert health["upstream"].startswith("http://127.0.0.1:")

    messages: Messages = [{"role": "user", "content": "offline?"}]
    async with proxy.client() as client:
        first, _ = await ask(client, messages, stream=True)
        messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "yes"}]
        second, _ = await ask(client, messages, stream=False)
    assert first.startswith("Turn 1 of chat ")
    assert second.endswith('Earlier you said: "offline?".')
    calls = fake[fake_upstream.CALLS]
    assert [c.parent_id for c in calls] == [None, calls[0].new_parent_id]


def test_create_app_picks_the_mode() -> None:
    assert proxy_server.create_app(db="x.db")[proxy_server.UPSTREAM].mode == "stateful"
    app = proxy_server.create_app(db="x.db", upstream="http://example.invalid/v1")
    assert app[proxy_server.UPSTREAM].mode == "openai"
    with pytest.raises(ValueError, match="mode"):
        proxy_server.create_app(db="x.db", mode="bogus")  # type: ignore[arg-type]


async def test_health(make_proxy: ProxyFactory, upstream: TestServer) -> None:
    proxy = await make_proxy("openai", upstream_url(upstream, "openai"))
    async with aiohttp.ClientSession() as http, http.get(proxy.url("/health")) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {
        "status": "ok",
        "mode": "openai",
        "upstream": upstream_url(upstream, "openai"),
        "active_sessions": 0,
    }


async def test_concurrent_first_turns_each_get_their_own_upstream_chat(
    make_proxy: ProxyFactory, upstream: TestServer
) -> None:
    # Two clients opening with the same words are two conversations: each reply must be
    # written in the context of its own opening only (no shared chat, no stacked turns).
    proxy = await make_proxy("stateful", upstream_url(upstream, "stateful"))
    body = {"model": "qwen-fake", "messages": [{"role": "user", "content": "same start"}]}
    async with aiohttp.ClientSession() as http:

        async def post() -> int:
            async with http.post(proxy.url("/v1/chat/completions"), json=body) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(post() for _ in range(5)))
    assert statuses == [200] * 5
    chats = upstream.app[fake_upstream.CHATS].values()
    assert len(chats) == 5
    assert all(len(chat.nodes) == 2 for chat in chats)  # the opening and its reply


async def test_bad_requests_are_openai_errors(
    make_proxy: ProxyFactory, upstream: TestServer
) -> None:
    proxy = await make_proxy("stateful", upstream_url(upstream, "stateful"))
    url = proxy.url("/v1/chat/completions")
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=b"{not json") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        system_only = {"messages": [{"role": "system", "content": "no user here"}]}
        async with http.post(url, json=system_only) as resp:
            assert resp.status == 400
            assert "user message" in (await resp.json())["error"]["message"]
    assert upstream.app[fake_upstream.CALLS] == []


# --------------------------------------------------------------------------- upstream errors


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("mode", MODES)
async def test_upstream_error_becomes_502(
    make_proxy: ProxyFactory, upstream: TestServer, mode: str, stream: bool
) -> None:
    proxy = await make_proxy(mode, upstream_url(upstream, mode))
    async with proxy.client() as client:
        with pytest.raises(openai.InternalServerError) as excinfo:
            await ask(client, [{"role": "user", "content": "break [fail]"}], stream=stream)
    assert excinfo.value.status_code == 502
    assert "upstream returned 500" in excinfo.value.message
    assert "[fail]" in excinfo.value.message

    (response,) = await proxy.rows("responses")
    assert response["outcome"] == "upstream_error"
    assert response["status_code"] == 502
    assert "upstream returned 500" in response["error"]
    assert json.loads(response["openai_response"])["error"]["type"] == "upstream_error"
    (session,) = await proxy.rows("sessions")
    assert session["message_count"] == 0  # a failed turn is not counted


async def test_a_corrupted_session_parent_does_not_misroute_the_turn(
    make_proxy: ProxyFactory, upstream: TestServer
) -> None:
    # Continuation comes from the history's lineage, not from the session's last parent.
    proxy = await make_proxy("stateful", upstream_url(upstream, "stateful"))
    messages: Messages = [{"role": "user", "content": "first"}]
    async with proxy.client() as client:
        content, _ = await ask(client, messages, stream=True)
        (session,) = await proxy.rows("sessions")
        await proxy.store.manager.update_parent_id(session["id"], "lost-parent")
        messages += [{"role": "assistant", "content": content}, {"role": "user", "content": "2nd"}]
        await ask(client, messages, stream=True)
    first_call, second = upstream.app[fake_upstream.CALLS]
    assert (second.status, second.chat_id) == (200, first_call.chat_id)
    assert second.parent_id == first_call.new_parent_id


async def test_upstream_rejecting_the_proxy_key_is_a_502(
    make_proxy: ProxyFactory, upstream: TestServer
) -> None:
    proxy = await make_proxy("stateful", upstream_url(upstream, "stateful"), "wrong-key")
    async with proxy.client() as client:
        with pytest.raises(openai.InternalServerError) as excinfo:
            await ask(client, [{"role": "user", "content": "hi"}], stream=False)
    # The client's own key is not at fault, so it must not see a 401.
    assert excinfo.value.status_code == 502
    assert "upstream returned 401" in excinfo.value.message


async def test_openai_mode_without_proxy_key_forwards_the_client_key(
    make_proxy: ProxyFactory, upstream: TestServer
) -> None:
    proxy = await make_proxy("openai", upstream_url(upstream, "openai"), None)
    messages: Messages = [{"role": "user", "content": "hi"}]
    async with proxy.client(api_key=UPSTREAM_KEY) as client:
        content, _ = await ask(client, messages, stream=True)
    assert content.startswith("You sent 1 messages.")
    async with proxy.client(api_key="not-the-key") as client:
        with pytest.raises(openai.AuthenticationError) as excinfo:
            await ask(client, messages, stream=False)
    assert excinfo.value.status_code == 401  # the client's own credentials were wrong


@pytest.mark.parametrize("mode", MODES)
async def test_stream_broken_mid_reply(
    make_proxy: ProxyFactory, upstream: TestServer, mode: str
) -> None:
    proxy = await make_proxy(mode, upstream_url(upstream, mode))
    parts: list[str] = []
    async with proxy.client() as client:
        chunks = await client.chat.completions.create(
            model="qwen-fake",
            messages=[{"role": "user", "content": "long story [fail-mid]"}],
            stream=True,
        )
        with pytest.raises(openai.APIError) as excinfo:
            await collect(chunks, parts)
    assert "broke off" in excinfo.value.message
    assert "".join(parts)  # some content arrived before the break

    (response,) = await proxy.rows("responses")
    assert response["outcome"] == "upstream_error"
    assert "broke off" in response["error"]
    # What was stored is exactly what the client got before the break.
    assert stored_content(response) == "".join(parts)
    if mode == "stateful":
        # The upstream announced (and keeps) the turn before breaking, so the session
        # follows it: a retry continues after the partial reply.
        (session,) = await proxy.rows("sessions")
        call = upstream.app[fake_upstream.CALLS][-1]
        assert not call.finished
        assert session["parent_id"] == call.new_parent_id


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("mode", MODES)
async def test_unreachable_upstream(make_proxy: ProxyFactory, mode: str, stream: bool) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    proxy = await make_proxy(mode, dead + ("/v1" if mode == "openai" else ""))
    async with proxy.client() as client:
        with pytest.raises(openai.InternalServerError) as excinfo:
            await ask(client, [{"role": "user", "content": "anyone there?"}], stream=stream)
    assert excinfo.value.status_code == 502
    assert f"cannot reach the upstream at {dead}/" in excinfo.value.message
    expected_path = "/v1/chat/completions" if mode == "openai" else "/api/v2/chats/new"
    assert f"{dead}{expected_path}" in excinfo.value.message

    (response,) = await proxy.rows("responses")
    assert response["outcome"] == "upstream_error"
    assert dead in response["error"]
    # The proxy itself is fine.
    async with aiohttp.ClientSession() as http, http.get(proxy.url("/health")) as resp:
        assert resp.status == 200


# --------------------------------------------------------------------------- client disconnects


@pytest.mark.parametrize("cancel", [True, False], ids=["cancelled", "write-fails"])
@pytest.mark.parametrize("mode", MODES)
async def test_client_disconnects_mid_reply(
    make_proxy: ProxyFactory, upstream: TestServer, mode: str, cancel: bool
) -> None:
    # With handler cancellation the proxy's handler is cancelled when the client hangs up;
    # without it (web.run_app's default) its next write to the client fails instead.
    proxy = await make_proxy(mode, upstream_url(upstream, mode), handler_cancellation=cancel)
    first = "tell me slowly [slow]"
    body = {
        "model": "qwen-fake",
        "stream": True,
        "messages": [{"role": "user", "content": first}],
    }
    received = b""
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            proxy.url("/v1/chat/completions"),
            json=body,
            headers={"Authorization": "Bearer client-key"},  # the same caller as below
        )
        assert resp.status == 200
        while received.count(b"\n\n") < 2:  # the role chunk and one content chunk
            received += await resp.content.readany()
        resp.close()  # hang up mid-reply

    async def recorded() -> bool:
        return len(await proxy.rows("responses")) == 1

    await poll(recorded, timeout=5.0)
    (response,) = await proxy.rows("responses")
    assert response["outcome"] == "client_disconnected"
    assert response["status_code"] == 200
    stored = stored_content(response)
    assert stored  # what had been sent is kept
    if mode == "stateful":
        full = upstream.app[fake_upstream.CHATS]
        (chat,) = full.values()
        reply = [n.message["content"] for n in chat.nodes.values() if n.parent is not None]
        assert reply[0].startswith(stored)
        assert stored != reply[0]

        # The proxy stopped reading: the upstream's stream was abandoned, not completed.
        async def upstream_done() -> bool:
            return upstream.app[fake_upstream.CALLS][-1].error is not None

        await poll(upstream_done, timeout=5.0)
        assert not upstream.app[fake_upstream.CALLS][-1].finished

    # The conversation goes on: the next turn is served in the same session.
    async with proxy.client() as client:
        content, _ = await ask(
            client,
            [
                {"role": "user", "content": first},
                {"role": "assistant", "content": stored},
                {"role": "user", "content": "go on"},
            ],
            stream=False,
        )
    assert content
    sessions = await proxy.rows("sessions")
    assert len(sessions) == 1


# --------------------------------------------------------------------------- the script


@pytest.mark.slow
def test_script_runs_offline_and_shuts_down_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "data" / "sessions.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "examples" / "proxy_server.py"),
            "--port",
            str(port),
            "--db",
            str(db),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        async def wait_until_listening() -> None:
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.1)
                    continue
                writer.close()
                await writer.wait_closed()
                return

        async def talk() -> str:
            await asyncio.wait_for(wait_until_listening(), 15)
            async with openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0
            ) as client:
                content, _ = await ask(client, [{"role": "user", "content": "hi"}], stream=True)
            return content

        content = asyncio.run(talk())
        assert content.startswith("Turn 1 of chat ")
    finally:
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT outcome FROM responses").fetchall() == [("completed",)]
        assert conn.execute("SELECT message_count FROM sessions").fetchall() == [(1,)]
