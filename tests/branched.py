"""A branched conversation recorded by really driving the example proxy (stateful mode) against
the fake upstream over HTTP: a system prompt, a regenerate, a tool-call turn, an edit of an
earlier turn, and a client that disconnects mid-stream.

Shared by test_query.py (the tree route), test_cli.py (`show`) and test_viewer_browser.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from aiohttp_session_store import StoreConfig, get_store
from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.models import RequestQuery

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import fake_upstream  # noqa: E402
import proxy_server  # noqa: E402
from test_fidelity import assemble  # noqa: E402  (how a client library assembles a stream)

TOKEN = "viewer-token-0123456789abcdef"
KEY = "sk-alice"
SYSTEM = "You are a terse assistant <b>who answers</b> in one line."
TOOL_RESULT = "18 degrees and sunny"
Message = dict[str, Any]


@dataclass
class Proxy:
    """The example proxy (query app mounted at /admin) and its fake upstream, both serving."""

    root: str
    app: Any
    messages: list[Message] = field(default_factory=list)

    async def ask(self, messages: list[Message], *, stream: bool) -> Message:
        body = {"model": "qwen-fake", "messages": messages, "stream": stream}
        headers = {"Authorization": f"Bearer {KEY}"}
        url = f"{self.root}/v1/chat/completions"
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json=body, headers=headers) as r,
        ):
            assert r.status == 200, await r.text()
            if not stream:
                message: Message = (await r.json())["choices"][0]["message"]
                return {k: v for k, v in message.items() if v is not None}
            return assemble(await r.read())

    async def say(self, text: str, *, stream: bool = False) -> Message:
        self.messages.append({"role": "user", "content": text})
        reply = await self.ask(self.messages, stream=stream)
        self.messages.append(reply)
        return reply

    async def hang_up(self, text: str) -> None:
        """Ask for a slow streamed reply and disconnect after its first event."""
        body = {
            "model": "qwen-fake",
            "stream": True,
            "messages": [*self.messages, {"role": "user", "content": text}],
        }
        headers = {"Authorization": f"Bearer {KEY}"}
        async with aiohttp.ClientSession() as http:
            r = await http.post(f"{self.root}/v1/chat/completions", json=body, headers=headers)
            await r.content.readline()
            r.close()


@contextlib.asynccontextmanager
async def running_proxy(database: str | Backend) -> AsyncIterator[Proxy]:
    upstream = TestServer(fake_upstream.create_app(slow_delay=0.2))
    await upstream.start_server()
    app = proxy_server.create_app(
        db=database,  # type: ignore[arg-type]  # a Backend is taken as is
        upstream=str(upstream.make_url("")).rstrip("/"),
        mode="stateful",
        config=StoreConfig(flush_interval=0.01),
    )
    app.add_subapp("/admin", get_store(app).query_app(token=TOKEN))
    server = TestServer(app)
    await server.start_server()
    try:
        yield Proxy(str(server.make_url("")).rstrip("/"), app)
    finally:
        await server.close()
        await upstream.close()


@dataclass(frozen=True)
class Recorded:
    session_id: str
    tool_call_id: str
    #: Replies by step: first, joke, joke_again, tool_call, tool_answer, edited.
    replies: dict[str, str]


async def record_branched(proxy: Proxy) -> Recorded:
    """Drive the conversation; returns once every call, the disconnect's too, is stored."""
    replies: dict[str, str] = {}
    proxy.messages = [{"role": "system", "content": SYSTEM}]
    replies["first"] = (await proxy.say("hi"))["content"]
    replies["joke"] = (await proxy.say("Tell me a joke.", stream=True))["content"]
    proxy.messages.pop()  # regenerate: the same history again, without the reply
    again = await proxy.ask(proxy.messages, stream=False)
    proxy.messages.append(again)
    replies["joke_again"] = again["content"]
    call = await proxy.say("[tool] weather in Paris", stream=True)
    tool_call_id = call["tool_calls"][0]["id"]
    replies["tool_call"] = call["content"]
    proxy.messages.append({"role": "tool", "tool_call_id": tool_call_id, "content": TOOL_RESULT})
    answer = await proxy.ask(proxy.messages, stream=False)
    proxy.messages.append(answer)
    replies["tool_answer"] = answer["content"]
    proxy.messages = proxy.messages[:3]  # edit turn 2: system, hi, first reply, then anew
    replies["edited"] = (await proxy.say("What is 2+2?"))["content"]
    await proxy.hang_up("[slow] Count slowly to twenty.")
    store = get_store(proxy.app)
    # The disconnect is recorded when the proxy's next write fails: wait for that record.
    for _ in range(500):
        await store.flush()
        facts = await store.backend.response_facts(RequestQuery())
        if len(facts) == 7:
            break
        await asyncio.sleep(0.01)
    assert sorted(f.outcome for f in facts) == ["client_disconnected"] + ["completed"] * 6
    (session_id,) = {f.session_id for f in facts}
    assert session_id is not None
    return Recorded(session_id, tool_call_id, replies)


async def fill_branched(database: str | Backend) -> Recorded:
    async with running_proxy(database) as proxy:
        return await record_branched(proxy)
