"""Conversation fidelity: the upstream's context always equals what the client believes.

The example proxy runs in stateful mode against the fake Qwen-style upstream, over real
HTTP. After every call the test walks the upstream's parent chain from the new reply to
the root and compares it, message by message (by the lineage's canonical form), with the
messages the client sent plus the reply it received. Every scenario runs streamed and not.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from aiohttp_session_store import StoreConfig, get_store
from aiohttp_session_store.lineage import canonical
from aiohttp_session_store.sse import SSEParser

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = str(ROOT / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import fake_upstream  # noqa: E402
import proxy_server  # noqa: E402

Message = dict[str, Any]
PATH = "/v1/chat/completions"


@dataclass
class Conversation:
    """One client: its history, as a chat UI keeps it, and how it talks to the proxy."""

    proxy: ProxyHandle
    key: str | None
    stream: bool
    messages: list[Message] = field(default_factory=list)

    async def send(self) -> Message:
        """Send the history; append nothing. Returns the reply and checks fidelity."""
        reply = await self.proxy.ask(self.messages, key=self.key, stream=self.stream)
        self.proxy.check_fidelity(self.messages, reply)
        return reply

    async def say(self, text: str) -> Message:
        self.messages.append({"role": "user", "content": text})
        reply = await self.send()
        self.messages.append(reply)
        return reply

    async def regenerate(self) -> Message:
        """Drop the last reply and ask again for the same history."""
        assert self.messages[-1]["role"] == "assistant"
        self.messages.pop()
        reply = await self.send()
        self.messages.append(reply)
        return reply


@dataclass
class ProxyHandle:
    upstream: TestServer
    root: str
    app: web.Application | None = None

    @property
    def upstream_app(self) -> web.Application:
        return self.upstream.app

    async def ask(self, messages: list[Message], *, key: str | None, stream: bool) -> Message:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = {"model": "qwen-fake", "messages": messages, "stream": stream}
        async with (
            aiohttp.ClientSession() as http,
            http.post(self.root + PATH, json=body, headers=headers) as resp,
        ):
            assert resp.status == 200, await resp.text()
            if not stream:
                data = await resp.json()
                message: Message = data["choices"][0]["message"]
                return {k: v for k, v in message.items() if v is not None}
            return assemble(await resp.read())

    def check_fidelity(self, messages: list[Message], reply: Message) -> None:
        call = self.upstream_app[fake_upstream.CALLS][-1]
        assert call.status == 200
        assert call.new_parent_id is not None
        chain = fake_upstream.conversation(self.upstream_app, call.new_parent_id)
        assert [canonical(m) for m in chain] == [canonical(m) for m in [*messages, reply]]


def assemble(raw: bytes) -> Message:
    """The assistant message of an OpenAI SSE reply, as a client library assembles it."""
    parser = SSEParser()
    content: list[str] = []
    calls: dict[int, Message] = {}
    for event in [*parser.feed(raw), *parser.close()]:
        if event.data == "[DONE]":
            break
        chunk = json.loads(event.data)
        assert "error" not in chunk, chunk
        for choice in chunk.get("choices", ()):
            delta = choice.get("delta", {})
            content.append(delta.get("content") or "")
            for piece in delta.get("tool_calls") or ():
                call = calls.setdefault(
                    piece["index"],
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                call["id"] = piece.get("id") or call["id"]
                function = piece.get("function", {})
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
    message: Message = {"role": "assistant", "content": "".join(content)}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


ProxyFactory = Callable[..., Awaitable[ProxyHandle]]


@pytest.fixture
async def upstream(aiohttp_server: AiohttpServer) -> TestServer:
    return await aiohttp_server(fake_upstream.create_app())


@pytest.fixture
async def start_proxy(
    aiohttp_server: AiohttpServer, upstream: TestServer, tmp_path: Path
) -> AsyncIterator[ProxyFactory]:
    servers: list[TestServer] = []

    async def start(**config: Any) -> ProxyHandle:
        app = proxy_server.create_app(
            db=tmp_path / "sessions.db",
            upstream=str(upstream.make_url("")).rstrip("/"),
            mode="stateful",
            config=StoreConfig(flush_interval=0.01, **config),
        )
        server = await aiohttp_server(app)
        servers.append(server)
        return ProxyHandle(upstream, str(server.make_url("")).rstrip("/"), app)

    yield start
    for server in servers:
        await server.close()


STREAM = pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
OPENERS = ["hi", "Hello", "Write a haiku about the sea, please, in English and then in French"]


@STREAM
@pytest.mark.parametrize("opener", OPENERS)
async def test_five_turn_continuation(start_proxy: ProxyFactory, stream: bool, opener: str) -> None:
    proxy = await start_proxy()
    chat = Conversation(proxy, "alice", stream)
    for text in [opener, "What is 2+2?", "Why?", "Say it in French.", "Thanks!"]:
        await chat.say(text)
    calls = proxy.upstream_app[fake_upstream.CALLS]
    assert len({c.chat_id for c in calls}) == 1  # one upstream chat
    assert [len(c.messages) for c in calls] == [1, 1, 1, 1, 1]  # only the new message


@STREAM
@pytest.mark.parametrize("opener", OPENERS[:2])
async def test_regenerate_attaches_beside_the_dropped_reply(
    start_proxy: ProxyFactory, stream: bool, opener: str
) -> None:
    proxy = await start_proxy()
    chat = Conversation(proxy, "alice", stream)
    await chat.say(opener)
    await chat.say("Tell me a joke.")
    first = chat.messages[-1]
    second = await chat.regenerate()
    third = await chat.regenerate()  # twice in a row
    assert len({first["content"], second["content"], third["content"]}) == 3
    calls = proxy.upstream_app[fake_upstream.CALLS]
    # Each regenerate re-sent only the question, under the same parent: siblings.
    assert calls[-1].parent_id == calls[-2].parent_id == calls[-3].parent_id
    await chat.say("Another one.")


@STREAM
@pytest.mark.parametrize("edited", ["What is 3+3?", "Never mind, what is the capital of Peru?"])
async def test_edit_an_earlier_turn_and_go_on(
    start_proxy: ProxyFactory, stream: bool, edited: str
) -> None:
    proxy = await start_proxy()
    chat = Conversation(proxy, "alice", stream)
    await chat.say("hi")
    await chat.say("What is 2+2?")
    await chat.say("And times ten?")
    # The user edits turn 2: the history is cut there and goes on from the edit.
    chat.messages = chat.messages[:2]
    await chat.say(edited)
    await chat.say("And times ten?")
    # Editing the very first message is a new conversation.
    chat.messages = []
    await chat.say("hi there")


@STREAM
@pytest.mark.parametrize("keys", [("alice", "bob"), (None, None)], ids=["keys", "no-credential"])
@pytest.mark.parametrize("opener", OPENERS[:2])
async def test_two_users_with_the_same_opener_interleaved(
    start_proxy: ProxyFactory, stream: bool, keys: tuple[str | None, str | None], opener: str
) -> None:
    proxy = await start_proxy()
    a = Conversation(proxy, keys[0], stream)
    b = Conversation(proxy, keys[1], stream)
    await a.say(opener)
    await b.say(opener)
    await a.say("My name is Ada.")
    await b.say("What is my name?")  # must not be able to learn it
    assert "Ada" not in b.messages[-1]["content"]
    await a.say("And mine?")
    await b.say("Goodbye.")
    chats_a = {c.chat_id for c in proxy.upstream_app[fake_upstream.CALLS][0::2]}
    chats_b = {c.chat_id for c in proxy.upstream_app[fake_upstream.CALLS][1::2]}
    assert len(chats_a) == len(chats_b) == 1
    assert chats_a != chats_b


@STREAM
async def test_client_chosen_session_id_grants_no_continuation(
    start_proxy: ProxyFactory, stream: bool
) -> None:
    proxy = await start_proxy()
    alice = Conversation(proxy, "alice", stream)
    await alice.say("hi")
    await alice.say("My secret is pineapple.")
    alices_chat = proxy.upstream_app[fake_upstream.CALLS][0].chat_id
    assert proxy.app is not None
    (alices_session,) = await get_store(proxy.app).manager.get_active_sessions()
    # Mallory names Alice's session, and the plain MD5 of her opener, with her own history.
    for session_id in (alices_session, get_store(proxy.app).manager.generate_session_id("hi")):
        headers = {"Authorization": "Bearer mallory", "X-Session-Id": session_id}
        body = {
            "model": "qwen-fake",
            "stream": stream,
            "messages": [{"role": "user", "content": "hi"}],
        }
        async with (
            aiohttp.ClientSession() as http,
            http.post(proxy.root + PATH, json=body, headers=headers) as resp,
        ):
            assert resp.status == 200
            await resp.read()
        call = proxy.upstream_app[fake_upstream.CALLS][-1]
        assert call.chat_id != alices_chat
        seen = fake_upstream.conversation(proxy.upstream_app, call.new_parent_id or "")
        assert "pineapple" not in json.dumps(seen)


@STREAM
async def test_system_message_changed_dropped_added_late(
    start_proxy: ProxyFactory, stream: bool
) -> None:
    proxy = await start_proxy()
    chat = Conversation(proxy, "alice", stream)
    chat.messages.append({"role": "system", "content": "You are terse."})
    await chat.say("hi")
    await chat.say("What is 2+2?")
    chat.messages[0] = {"role": "system", "content": "You are verbose."}  # changed
    await chat.say("Explain.")
    assert 'My instructions: "You are verbose."' in chat.messages[-1]["content"]
    del chat.messages[0]  # dropped
    await chat.say("Again?")
    assert "My instructions" not in chat.messages[-1]["content"]
    chat.messages.insert(0, {"role": "system", "content": "Answer in French."})  # added late
    await chat.say("Bonjour?")
    assert 'My instructions: "Answer in French."' in chat.messages[-1]["content"]


@STREAM
async def test_proxy_restarted_gracefully_mid_conversation(
    aiohttp_server: AiohttpServer, upstream: TestServer, tmp_path: Path, stream: bool
) -> None:
    async def serve() -> tuple[TestServer, ProxyHandle]:
        app = proxy_server.create_app(
            db=tmp_path / "sessions.db",
            upstream=str(upstream.make_url("")).rstrip("/"),
            mode="stateful",
        )
        server = await aiohttp_server(app)
        return server, ProxyHandle(upstream, str(server.make_url("")).rstrip("/"), app)

    server, proxy = await serve()
    chat = Conversation(proxy, "alice", stream)
    await chat.say("hi")
    await chat.say("What is 2+2?")
    await server.close()  # graceful: everything committed
    server, chat.proxy = await serve()
    await chat.say("And times ten?")
    calls = upstream.app[fake_upstream.CALLS]
    assert calls[-1].chat_id == calls[0].chat_id  # continued, not restarted
    assert len(calls[-1].messages) == 1
    await server.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _spawn_proxy(db: Path, upstream_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; the test polls /health
        [
            sys.executable,
            str(ROOT / "examples" / "proxy_server.py"),
            "--db",
            str(db),
            "--port",
            str(port),
            "--mode",
            "stateful",
            "--upstream",
            upstream_url,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    root = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(200):
            try:
                async with http.get(root + "/health") as resp:
                    if resp.status == 200:
                        return proc, root
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    raise AssertionError("the proxy did not start")


@pytest.mark.slow
@STREAM
async def test_proxy_killed_right_after_a_reply(
    upstream: TestServer, tmp_path: Path, stream: bool
) -> None:
    url = str(upstream.make_url("")).rstrip("/")
    db = tmp_path / "sessions.db"
    proc, root = await _spawn_proxy(db, url)
    try:
        chat = Conversation(ProxyHandle(upstream, root), "alice", stream)
        await chat.say("hi")
        await chat.say("What is 2+2?")
        proc.send_signal(signal.SIGKILL)  # right after a reply: its node may be lost
        proc.wait()
        proc, chat.proxy.root = await _spawn_proxy(db, url)
        await chat.say("And times ten?")  # right either way: continued, or a new chat
        await chat.say("Thanks.")
    finally:
        proc.kill()
        proc.wait()


@STREAM
async def test_session_expired_or_store_reset_before_the_next_turn(
    start_proxy: ProxyFactory, stream: bool
) -> None:
    proxy = await start_proxy()
    chat = Conversation(proxy, "alice", stream)
    await chat.say("hi")
    await chat.say("What is 2+2?")
    assert proxy.app is not None
    manager = get_store(proxy.app).manager
    await manager.clear_all()  # every session gone, as after expiry
    await chat.say("And times ten?")
    calls = proxy.upstream_app[fake_upstream.CALLS]
    assert calls[-1].chat_id == calls[0].chat_id  # lineage outlives the session


@STREAM
async def test_session_expired_before_the_next_turn(
    start_proxy: ProxyFactory, stream: bool
) -> None:
    now = [1_800_000_000_000]
    proxy = await start_proxy(session_timeout=60, clock=lambda: now[0])
    chat = Conversation(proxy, "alice", stream)
    await chat.say("hi")
    await chat.say("What is 2+2?")
    now[0] += 3_600_000  # an hour later: the session expired
    assert proxy.app is not None
    assert await get_store(proxy.app).manager.get_session_count() == 0
    await chat.say("And times ten?")
    calls = proxy.upstream_app[fake_upstream.CALLS]
    assert calls[-1].chat_id == calls[0].chat_id  # the conversation's lineage outlived it
    assert len(calls[-1].messages) == 1


@STREAM
async def test_upstream_forgot_the_chat(start_proxy: ProxyFactory, stream: bool) -> None:
    proxy = await start_proxy()
    chat = Conversation(proxy, "alice", stream)
    await chat.say("hi")
    await chat.say("What is 2+2?")
    proxy.upstream_app[fake_upstream.CHATS].clear()  # the upstream lost everything
    await chat.say("And times ten?")  # a new chat, with the whole history
    calls = proxy.upstream_app[fake_upstream.CALLS]
    assert calls[-1].parent_id is None
    assert len(calls[-1].messages) == 5
    await chat.say("Thanks.")  # and it goes on from there
    assert len(proxy.upstream_app[fake_upstream.CALLS][-1].messages) == 1


@STREAM
async def test_tool_call_turns(start_proxy: ProxyFactory, stream: bool) -> None:
    proxy = await start_proxy()
    chat = Conversation(proxy, "alice", stream)
    await chat.say("hi")
    reply = await chat.say("What is the weather in Paris? [tool]")
    (call,) = reply["tool_calls"]
    chat.messages.append({"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C"})
    answer = await chat.send()
    assert 'the tool said "Sunny, 21 C"' in answer["content"]
    chat.messages.append(answer)
    assert len(proxy.upstream_app[fake_upstream.CALLS][-1].messages) == 1  # just the result
    await chat.say("Thanks!")


# --------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_racing_regenerates_leave_a_consistent_tree(
    aiohttp_server: AiohttpServer,
    upstream: TestServer,
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    if backend == "postgres":
        import asyncpg
        from conftest import PG_DSN

        schema = request.getfixturevalue("pg_schema")  # dropped after the test
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        finally:
            await conn.close()
        database = f"{PG_DSN}?search_path={schema}"
        instances = 2  # two proxies sharing one store, as behind a load balancer
    else:
        database = str(tmp_path / "sessions.db")
        instances = 1
    proxies: list[ProxyHandle] = []
    for _ in range(instances):
        app = proxy_server.create_app(
            db=database,
            upstream=str(upstream.make_url("")).rstrip("/"),
            mode="stateful",
            config=StoreConfig(flush_interval=0.01),
        )
        server = await aiohttp_server(app)
        proxies.append(ProxyHandle(upstream, str(server.make_url("")).rstrip("/"), app))
    base = Conversation(proxies[0], "alice", False)
    await base.say("hi")
    await base.say("Tell me a joke.")
    for proxy in proxies:
        assert proxy.app is not None
        await get_store(proxy.app).flush()

    racers = [
        Conversation(proxies[i % instances], "alice", bool(i % 2), list(base.messages[:-1]))
        for i in range(6)
    ]

    async def regenerate_and_go_on(index: int, chat: Conversation) -> None:
        # Not `say()`: its check reads the upstream's latest call, which a racer may own.
        chat.messages.append(await chat.proxy.ask(chat.messages, key="alice", stream=chat.stream))
        chat.messages.append({"role": "user", "content": f"Another one, #{index}."})
        chat.messages.append(await chat.proxy.ask(chat.messages, key="alice", stream=chat.stream))

    await asyncio.gather(*(regenerate_and_go_on(i, c) for i, c in enumerate(racers)))
    for chat in racers:
        upstream_calls = upstream.app[fake_upstream.CALLS]
        # Each racer's last reply is in the upstream, in the context the racer believes.
        last = chat.messages[-1]["content"]
        (call,) = [
            c
            for c in upstream_calls
            if c.new_parent_id
            and fake_upstream.conversation(upstream.app, c.new_parent_id)[-1]["content"] == last
        ]
        assert call.new_parent_id is not None
        chain = fake_upstream.conversation(upstream.app, call.new_parent_id)
        assert [canonical(m) for m in chain] == [canonical(m) for m in chat.messages]

    for proxy in proxies:
        assert proxy.app is not None
        await get_store(proxy.app).flush()
    manager = get_store(proxies[0].app).manager  # type: ignore[arg-type]
    (session_id,) = {s for s, _ in await manager.get_all_sessions()}
    nodes = await manager.backend.list_lineage_nodes(session_id)
    hashes = [n.hash for n in nodes]
    assert len(hashes) == len(set(hashes))  # no duplicate row
    # No lost node: the two base turns, and two per racer (identical replies share one).
    distinct_replies = {c.messages[-3]["content"] for c in racers}
    assert len(nodes) == 2 + len(distinct_replies) + len(racers)
    known = set(hashes)
    assert all(n.parent_hash is None or n.parent_hash in known for n in nodes)
