"""The fake Qwen-style upstream (examples/fake_upstream.py) on its own, through aiohttp_client."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

# The examples are scripts, not a package: import them the way `python examples/x.py` does.
EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import fake_upstream  # noqa: E402

Client = TestClient[Any, Any]


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(fake_upstream.create_app())


async def new_chat(client: Client) -> str:
    resp = await client.post("/api/v2/chats/new", json={"title": "t", "models": ["qwen-fake"]})
    assert resp.status == 200
    body = await resp.json()
    assert body["success"] is True
    chat_id: str = body["data"]["id"]
    return chat_id


def completion_body(
    chat_id: str, parent_id: str | None, text: str, *, stream: bool
) -> dict[str, Any]:
    return {
        "stream": stream,
        "incremental_output": True,
        "chat_id": chat_id,
        "parent_id": parent_id,
        "messages": [{"role": "user", "content": text, "parent_id": parent_id}],
    }


async def read_events(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream."""
    text = await resp.text()
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            events.append(json.loads(block[len("data: ") :]))
    return events


async def drain(resp: aiohttp.ClientResponse, sink: bytearray) -> None:
    """Read a body chunk by chunk into ``sink``, so what came before an error is kept."""
    async for chunk in resp.content.iter_any():
        sink += chunk


async def turn(client: Client, chat_id: str, parent_id: str | None, text: str) -> tuple[str, str]:
    """One non-streaming turn: (next parent_id, reply content)."""
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={chat_id}",
        json=completion_body(chat_id, parent_id, text, stream=False),
    )
    assert resp.status == 200, await resp.text()
    data = (await resp.json())["data"]
    return data["parent_id"], data["choices"][0]["message"]["content"]


async def test_new_chat_returns_distinct_ids(client: Client) -> None:
    first, second = await new_chat(client), await new_chat(client)
    assert first != second
    assert set(client.app[fake_upstream.CHATS]) == {first, second}


async def test_non_streaming_shape(client: Client) -> None:
    chat_id = await new_chat(client)
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={chat_id}",
        json=completion_body(chat_id, None, "Hello there", stream=False),
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["success"] is True
    data = body["data"]
    assert set(data) >= {"parent_id", "message_id", "choices", "usage"}
    assert data["parent_id"] != data["message_id"]
    assert data["choices"][0]["message"] == {
        "role": "assistant",
        "content": f'Turn 1 of chat {chat_id}: you said "Hello there". '
        "This is the start of our conversation.",
    }
    usage = data["usage"]
    assert usage["input_tokens"] == 2
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


async def test_chained_turns_carry_context(client: Client) -> None:
    chat_id = await new_chat(client)
    p1, _ = await turn(client, chat_id, None, "one")
    p2, _ = await turn(client, chat_id, p1, "two")
    p3, reply = await turn(client, chat_id, p2, "three")
    assert reply == f'Turn 3 of chat {chat_id}: you said "three". Earlier you said: "one", "two".'
    calls = client.app[fake_upstream.CALLS]
    assert [(c.parent_id, c.message, c.new_parent_id) for c in calls] == [
        (None, "one", p1),
        (p1, "two", p2),
        (p2, "three", p3),
    ]
    assert all(c.finished and c.status == 200 and c.chat_id == chat_id for c in calls)


async def test_branching_from_an_earlier_parent(client: Client) -> None:
    chat_id = await new_chat(client)
    p1, _ = await turn(client, chat_id, None, "one")
    await turn(client, chat_id, p1, "two")
    _, reply = await turn(client, chat_id, p1, "other two")
    assert reply.startswith("Turn 2 of")
    assert reply.endswith('Earlier you said: "one".')


async def test_chats_are_separate(client: Client) -> None:
    a, b = await new_chat(client), await new_chat(client)
    pa, _ = await turn(client, a, None, "in a")
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={b}", json=completion_body(b, pa, "x", stream=False)
    )
    assert resp.status == 400  # a parent of chat a is unknown in chat b


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_parent_rejected(client: Client, stream: bool) -> None:
    chat_id = await new_chat(client)
    await turn(client, chat_id, None, "one")
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={chat_id}",
        json=completion_body(chat_id, "no-such-parent", "two", stream=stream),
    )
    assert resp.status == 400
    body = await resp.json()
    assert body["success"] is False
    assert "no-such-parent" in body["data"]["details"]
    call = client.app[fake_upstream.CALLS][-1]
    assert (call.status, call.parent_id, call.new_parent_id) == (400, "no-such-parent", None)


async def test_null_parent_starts_a_new_root_in_the_chat(client: Client) -> None:
    # DESIGN: a null parent_id is a new root in that chat, whatever the chat holds already.
    chat_id = await new_chat(client)
    await turn(client, chat_id, None, "one")
    node, reply = await turn(client, chat_id, None, "two")
    assert reply.startswith(f'Turn 1 of chat {chat_id}: you said "two".')
    context = fake_upstream.conversation(client.app, node)
    assert [m["content"] for m in context] == ["two", reply]


async def test_several_messages_become_a_chain(client: Client) -> None:
    chat_id = await new_chat(client)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "an earlier answer"},
        {"role": "user", "content": "two"},
    ]
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={chat_id}",
        json={"stream": False, "parent_id": None, "messages": messages},
    )
    assert resp.status == 200, await resp.text()
    data = (await resp.json())["data"]
    reply = data["choices"][0]["message"]["content"]
    assert reply == (
        f'Turn 2 of chat {chat_id}: you said "two". Earlier you said: "one". '
        'My instructions: "Be brief.".'
    )
    context = fake_upstream.conversation(client.app, data["parent_id"])
    assert [(m["role"], m["content"]) for m in context] == [
        *((m["role"], m["content"]) for m in messages),
        ("assistant", reply),
    ]


async def test_tool_marker_gets_a_tool_call(client: Client) -> None:
    chat_id = await new_chat(client)
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={chat_id}",
        json=completion_body(chat_id, None, "weather in Paris [tool]", stream=False),
    )
    choice = (await resp.json())["data"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "lookup", "arguments": '{"query": "weather in Paris"}'}
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={chat_id}",
        json=completion_body(chat_id, None, "weather in Paris [tool]", stream=True),
    )
    events = await read_events(resp)
    arguments = "".join(
        tc["function"].get("arguments", "")
        for e in events[1:]
        for tc in e["choices"][0]["delta"].get("tool_calls", ())
    )
    assert arguments == '{"query": "weather in Paris"}'


async def test_unknown_message_role_rejected(client: Client) -> None:
    chat_id = await new_chat(client)
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={chat_id}",
        json={"stream": False, "parent_id": None, "messages": [{"role": "wizard", "content": "x"}]},
    )
    assert resp.status == 400
    assert client.app[fake_upstream.CHATS][chat_id].nodes == {}


async def test_unknown_chat_rejected(client: Client) -> None:
    resp = await client.post(
        "/api/v2/chat/completions?chat_id=nope",
        json=completion_body("nope", None, "x", stream=True),
    )
    assert resp.status == 400
    assert (await resp.json())["success"] is False


async def test_request_without_user_message_rejected(client: Client) -> None:
    chat_id = await new_chat(client)
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={chat_id}",
        json={"stream": False, "chat_id": chat_id, "parent_id": None, "messages": []},
    )
    assert resp.status == 400
    resp = await client.post(f"/api/v2/chat/completions?chat_id={chat_id}", data=b"not json")
    assert resp.status == 400


async def test_streaming_event_shapes(client: Client) -> None:
    chat_id = await new_chat(client)
    p1, _ = await turn(client, chat_id, None, "first message")
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={chat_id}",
        json=completion_body(chat_id, p1, "second message", stream=True),
    )
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    events = await read_events(resp)

    created = events[0]["response.created"]
    assert created["chat_id"] == chat_id
    assert created["parent_id"] != created["response_id"]
    call = client.app[fake_upstream.CALLS][-1]
    assert call.new_parent_id == created["parent_id"]
    assert call.finished

    deltas, finished = events[1:-1], events[-1]
    assert 5 <= len(deltas) <= fake_upstream.MAX_DELTAS
    for event in deltas:
        delta = event["choices"][0]["delta"]
        assert delta["role"] == "assistant"
        assert delta["status"] == "typing"
        assert delta["content"]
    assert finished["choices"][0]["delta"]["status"] == "finished"
    assert finished["choices"][0]["delta"]["content"] == ""

    content = "".join(e["choices"][0]["delta"]["content"] for e in deltas)
    assert content == (
        f'Turn 2 of chat {chat_id}: you said "second message". Earlier you said: "first message".'
    )
    # Usage is cumulative: output grows with each delta and ends at the whole reply.
    outputs = [e["usage"]["output_tokens"] for e in deltas]
    assert outputs == sorted(outputs)
    assert outputs[-1] == len(content.split()) == finished["usage"]["output_tokens"]
    assert all(
        e["usage"]["total_tokens"] == e["usage"]["input_tokens"] + e["usage"]["output_tokens"]
        for e in events[1:]
    )

    # The announced parent continues the chain.
    _, reply = await turn(client, chat_id, created["parent_id"], "third")
    assert reply.startswith("Turn 3 of")


async def test_fail_marker_is_a_500(client: Client) -> None:
    chat_id = await new_chat(client)
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={chat_id}",
        json=completion_body(chat_id, None, "please [fail]", stream=True),
    )
    assert resp.status == 500
    body = await resp.json()
    assert body["success"] is False
    assert body["data"]["code"] == "Internal_Error"
    # A failed first turn leaves the chat empty: it can be retried with parent_id null.
    await turn(client, chat_id, None, "retry")


async def test_fail_mid_drops_the_stream(client: Client) -> None:
    chat_id = await new_chat(client)
    resp = await client.post(
        f"/api/v2/chat/completions?chat_id={chat_id}",
        json=completion_body(chat_id, None, "long reply please [fail-mid]", stream=True),
    )
    assert resp.status == 200
    received = bytearray()
    with pytest.raises(aiohttp.ClientPayloadError):
        await drain(resp, received)
    events = [json.loads(b[len(b"data: ") :]) for b in received.split(b"\n\n") if b]
    assert "response.created" in events[0]
    assert len(events) == 1 + fake_upstream.DELTAS_BEFORE_FAILURE
    call = client.app[fake_upstream.CALLS][-1]
    assert not call.finished
    # The turn exists server side even though its stream broke.
    _, reply = await turn(client, chat_id, events[0]["response.created"]["parent_id"], "again")
    assert reply.startswith("Turn 2 of")


async def test_api_key_required_when_configured(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(fake_upstream.create_app(api_key="sekrit"))
    resp = await client.post("/api/v2/chats/new", json={})
    assert resp.status == 401
    assert (await resp.json())["success"] is False
    resp = await client.post("/v1/chat/completions", json={"messages": []})
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_api_key"
    resp = await client.post(
        "/api/v2/chats/new", json={}, headers={"Authorization": "Bearer sekrit"}
    )
    assert resp.status == 200


async def test_openai_endpoint_non_streaming(client: Client) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": [{"type": "text", "text": "how are you"}]},
    ]
    resp = await client.post("/v1/chat/completions", json={"model": "m1", "messages": messages})
    assert resp.status == 200
    body = await resp.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "m1"
    assert body["choices"][0]["message"]["content"] == (
        'You sent 4 messages. Your last message was: "how are you".'
    )
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


@pytest.mark.parametrize("include_usage", [False, True])
async def test_openai_endpoint_streaming(client: Client, include_usage: bool) -> None:
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": "m1",
            "stream": True,
            "stream_options": {"include_usage": include_usage},
            "messages": [{"role": "user", "content": "stream me"}],
        },
    )
    assert resp.status == 200
    text = await resp.text()
    assert text.endswith("data: [DONE]\n\n")
    chunks = [json.loads(b[len("data: ") :]) for b in text.split("\n\n") if b and "[DONE]" not in b]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert content == 'You sent 1 messages. Your last message was: "stream me".'
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "stop"
    usage_chunks = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert len(usage_chunks) == 1
        assert usage_chunks[0]["choices"] == []
        assert chunks[-1] is usage_chunks[0]
    else:
        assert usage_chunks == []


async def test_openai_endpoint_errors(client: Client) -> None:
    resp = await client.post("/v1/chat/completions", json={"messages": []})
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    resp = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x [fail]"}]}
    )
    assert resp.status == 500
    assert (await resp.json())["error"]["type"] == "server_error"


def test_split_deltas_rejoins() -> None:
    text = 'Turn 1 of chat abc: you said "hi there". This is the start.'
    pieces = fake_upstream._split_deltas(text)
    assert "".join(pieces) == text
    assert 1 < len(pieces) <= fake_upstream.MAX_DELTAS
    assert fake_upstream._split_deltas("one") == ["one"]
