"""Secrets and personal data: what never reaches the database file, and per-credential ids.

Redacted headers are checked against the file's bytes (database, WAL and shared memory),
not just the columns; the body redaction hook against every place a body or a user's
words are stored; `scope_header` through the middleware and through the example proxy.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from aiohttp_session_store import (
    SessionStore,
    StoreConfig,
    generate_session_id,
    get_session,
    set_upstream,
    setup,
)
from aiohttp_session_store.hashing import scoped_session_id

PATH = "/v1/chat/completions"
Client = TestClient[web.Request, web.Application]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = str(ROOT / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)


def chat(*texts: str) -> dict[str, Any]:
    messages: list[dict[str, str]] = []
    for i, text in enumerate(texts):
        if i:
            messages.append({"role": "assistant", "content": f"reply {i}"})
        messages.append({"role": "user", "content": text})
    return {"model": "m", "messages": messages}


def file_bytes(db: Path) -> bytes:
    """Every byte the store left on disk: the database and any WAL / shared-memory file."""
    files = sorted(db.parent.glob(db.name + "*"))
    assert db in files
    return b"".join(f.read_bytes() for f in files)


def rows(db: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def start(
    aiohttp_client: AiohttpClient, db: Path, handler: Handler, **config: Any
) -> tuple[Client, SessionStore]:
    app = web.Application()
    store = setup(app, db, config=StoreConfig(**config))
    app.router.add_post(PATH, handler)
    return await aiohttp_client(app), store


async def session_reply(request: web.Request) -> web.Response:
    session = get_session(request)
    return web.json_response(
        {"session_id": session.id if session else None, "is_new": session and session.is_new}
    )


async def sse_reply(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in ("all ", "good"):
        chunk = {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": piece}}],
        }
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    await response.write_eof()
    return response


# --------------------------------------------------------------------------- redacted headers

SECRETS = {
    "Authorization": "Bearer sk-live-SECRET-AUTHZ-0001",
    "cookie": "sid=SECRET-COOKIE-0002",  # any case of a redacted name
    "X-API-KEY": "SECRET-APIKEY-0003",
    "Proxy-Authorization": "Basic U0VDUkVULVBST1hZLTAwMDQ=",
    "X-Upstream-Token": "SECRET-EXTRA-0005",  # via extra_redact_headers
    # Other vendors' credential headers, redacted by default.
    "api-key": "SECRET-AZURE-0006",
    "x-goog-api-key": "SECRET-GOOGLE-0007",
    "anthropic-api-key": "SECRET-ANTHROPIC-0008",
    "X-Auth-Token": "SECRET-AUTHTOKEN-0009",
}


@pytest.mark.parametrize("scope_header", [None, "Authorization"])
async def test_redacted_headers_never_reach_the_file(
    aiohttp_client: AiohttpClient, tmp_path: Path, scope_header: str | None
) -> None:
    db = tmp_path / "sessions.db"

    async def route(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await (sse_reply(request) if body.get("stream") else session_reply(request))

    client, store = await start(
        aiohttp_client,
        db,
        route,
        extra_redact_headers=("X-Upstream-Token",),
        scope_header=scope_header,
    )
    # A JSON call, a streamed one, and one the middleware answers itself (bad session id).
    for extra_headers, body in [
        ({}, chat("hello")),
        ({}, {**chat("hello"), "stream": True}),
        ({"X-Session-Id": "not valid!"}, chat("hello")),
    ]:
        async with client.post(PATH, json=body, headers={**SECRETS, **extra_headers}) as resp:
            await resp.read()
    await store.flush()

    stored = [json.loads(r["headers"]) for r in rows(db, "SELECT headers FROM requests")]
    assert len(stored) == 3
    for headers in stored:
        by_name = {k.lower(): v for k, v in headers.items()}
        for name in SECRETS:
            assert by_name[name.lower()] == "[REDACTED]"
    # Checked on the bytes while the store is open (WAL) and after it closed (checkpointed).
    raw = file_bytes(db)
    await client.close()
    raw += file_bytes(db)
    for secret in SECRETS.values():
        for needle in {secret, secret.split()[-1]}:
            assert needle.encode() not in raw, f"{needle!r} is in the database file"


BODY_SECRETS = {
    "api_key": "sk-SECRET-BODY-0010",
    "apiKey": "SECRET-BODY-0011",
    "key": "SECRET-0012",
}


@pytest.mark.parametrize("stream", [False, True])
async def test_credential_body_fields_never_reach_the_file(
    aiohttp_client: AiohttpClient, tmp_path: Path, stream: bool
) -> None:
    db = tmp_path / "sessions.db"

    async def route(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        set_upstream(request, request_body={**body, "api_key": "sk-SECRET-UPSTREAM-0013"})
        return await (sse_reply(request) if body.get("stream") else session_reply(request))

    client, store = await start(aiohttp_client, db, route)
    async with client.post(PATH, json={**chat("hello"), **BODY_SECRETS, "stream": stream}) as resp:
        assert resp.status == 200
        await resp.read()
    await store.flush()
    ((stored, upstream),) = rows(db, "SELECT openai_request, upstream_request FROM requests")
    assert json.loads(stored)["messages"] == chat("hello")["messages"]
    for name in BODY_SECRETS:
        assert json.loads(stored)[name] == "[REDACTED]"
    assert json.loads(upstream)["api_key"] == "[REDACTED]"
    raw = file_bytes(db)
    await client.close()
    raw += file_bytes(db)
    for secret in [*BODY_SECRETS.values(), "sk-SECRET-UPSTREAM-0013"]:
        assert secret.encode() not in raw, f"{secret!r} is in the database file"


# --------------------------------------------------------------------------- body redaction

EMAIL = "ada.lovelace@example.com"
EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+\.[\w.]+")


def scrub(value: Any) -> Any:
    """A PII hook as a user would write it: every e-mail address in any string, replaced."""
    if isinstance(value, str):
        return EMAIL_RE.sub("[EMAIL]", value)
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    return value


async def pii_everywhere(request: web.Request) -> web.StreamResponse:
    """Echoes the user's words in its reply and in what it 'sent upstream'."""
    body = await request.json()
    text = body["messages"][-1]["content"]
    set_upstream(
        request,
        request_body={"prompt": text},
        response_body={"output": f"noted: {text}"},
    )
    if body.get("stream"):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": f"noted: {text}"}}],
        }
        await response.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response
    return web.json_response(
        {
            "object": "chat.completion",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": f"noted: {text}"}}
            ],
        }
    )


async def pii_call(
    aiohttp_client: AiohttpClient, db: Path, *, stream: bool = False
) -> tuple[Client, SessionStore]:
    client, store = await start(aiohttp_client, db, pii_everywhere, redact_body=scrub)
    body = {**chat(f"my address is {EMAIL}"), "stream": stream}
    async with client.post(PATH, json=body) as resp:
        assert resp.status == 200
        assert EMAIL in await resp.text()  # the client itself gets its reply unchanged
    await store.flush()
    return client, store


async def test_body_hook_redacts_the_request_body(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    db = tmp_path / "sessions.db"
    await pii_call(aiohttp_client, db)
    (row,) = rows(db, "SELECT openai_request, upstream_request FROM requests")
    assert json.loads(row["openai_request"])["messages"][0]["content"] == "my address is [EMAIL]"
    assert json.loads(row["upstream_request"]) == {"prompt": "my address is [EMAIL]"}


async def test_body_hook_redacts_the_upstream_reply(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    db = tmp_path / "sessions.db"
    await pii_call(aiohttp_client, db)
    (row,) = rows(db, "SELECT upstream_response FROM responses")
    assert json.loads(row["upstream_response"]) == {"output": "noted: my address is [EMAIL]"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_body_hook_redacts_the_reply(
    aiohttp_client: AiohttpClient, tmp_path: Path, stream: bool
) -> None:
    db = tmp_path / "sessions.db"
    await pii_call(aiohttp_client, db, stream=stream)
    (row,) = rows(db, "SELECT openai_response FROM responses")
    reply = json.loads(row["openai_response"])
    assert reply["choices"][0]["message"]["content"] == "noted: my address is [EMAIL]"


async def test_body_hook_redacts_the_sessions_first_user_message(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    db = tmp_path / "sessions.db"
    await pii_call(aiohttp_client, db)
    (row,) = rows(db, "SELECT id, first_user_message FROM sessions")
    assert row["first_user_message"] == "my address is [EMAIL]"
    # The id is still derived from what the client sent, so the conversation continues.
    assert row["id"] == generate_session_id(f"my address is {EMAIL}")


async def test_body_hook_sees_upstream_text_bodies_too(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    # Proxies often keep the upstream's raw SSE as text (examples/proxy_server.py does):
    # a JSON string is a parsed JSON body, so it goes through the hook like any other.
    async def raw_upstream(request: web.Request) -> web.Response:
        set_upstream(
            request,
            request_body=f"user says {EMAIL}",
            response_body=f'data: {{"text": "hi {EMAIL}"}}\n\n',
        )
        return web.json_response({})

    db = tmp_path / "sessions.db"
    client, store = await start(aiohttp_client, db, raw_upstream, redact_body=scrub)
    async with client.post(PATH, json=chat("hello")) as resp:
        assert resp.status == 200
    await store.flush()
    ((upstream_request, upstream_response),) = rows(
        db,
        "SELECT q.upstream_request, r.upstream_response"
        " FROM requests q JOIN responses r USING (request_id)",
    )
    assert EMAIL not in upstream_request
    assert EMAIL not in upstream_response


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_body_hook_pii_never_reaches_the_file(
    aiohttp_client: AiohttpClient, tmp_path: Path, stream: bool
) -> None:
    db = tmp_path / "sessions.db"
    client, _ = await pii_call(aiohttp_client, db, stream=stream)
    await client.close()
    assert EMAIL.encode() not in file_bytes(db)


async def test_failing_body_hook_never_fails_the_call_nor_stores_in_clear(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    def broken(value: Any) -> Any:
        raise ValueError("the PII service is down")

    db = tmp_path / "sessions.db"
    client, store = await start(aiohttp_client, db, pii_everywhere, redact_body=broken)
    async with client.post(PATH, json=chat(f"my address is {EMAIL}")) as resp:
        assert resp.status == 200, await resp.text()
    await store.flush()
    assert len(rows(db, "SELECT 1 FROM requests")) == 1
    assert len(rows(db, "SELECT 1 FROM responses")) == 1
    await client.close()
    assert EMAIL.encode() not in file_bytes(db)


# --------------------------------------------------------------------------- scope_header


async def ask(client: Client, body: dict[str, Any], credential: str | None) -> dict[str, Any]:
    headers = {"Authorization": credential} if credential is not None else {}
    async with client.post(PATH, json=body, headers=headers) as resp:
        assert resp.status == 200
        reply: dict[str, Any] = await resp.json()
        return reply


async def test_scope_header_gives_each_credential_its_own_sessions(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client, store = await start(
        aiohttp_client, tmp_path / "s.db", session_reply, scope_header="Authorization"
    )
    opening = "Hi, can you help me with my taxes?"
    alice = await ask(client, chat(opening), "Bearer alice-key")
    bob = await ask(client, chat(opening), "Bearer bob-key")
    assert alice["is_new"]
    assert bob["is_new"]
    assert alice["session_id"] != bob["session_id"]
    # The documented derivation; never the plain MD5 anyone could compute from the words.
    assert alice["session_id"] == scoped_session_id("Bearer alice-key", opening)
    assert generate_session_id(opening) not in {alice["session_id"], bob["session_id"]}

    # Each continues their own conversation; the header name matches in any case.
    again = await ask(client, chat(opening, "and deductions?"), "Bearer alice-key")
    assert again == {"session_id": alice["session_id"], "is_new": False}
    async with client.post(
        PATH, json=chat(opening, "more"), headers={"authorization": "Bearer bob-key"}
    ) as resp:
        assert (await resp.json())["session_id"] == bob["session_id"]
    await store.flush()
    assert len(rows(tmp_path / "s.db", "SELECT id FROM sessions")) == 2


async def test_scope_header_missing_is_the_empty_credential(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    # Documented: calls without the header share one scope (the empty credential),
    # still distinct from every credentialed client and from the unscoped MD5.
    client, _ = await start(
        aiohttp_client, tmp_path / "s.db", session_reply, scope_header="Authorization"
    )
    anonymous = await ask(client, chat("hello"), None)
    assert anonymous["session_id"] == scoped_session_id("", "hello")
    assert anonymous["session_id"] != generate_session_id("hello")
    assert (await ask(client, chat("hello"), "Bearer k"))["session_id"] != anonymous["session_id"]


async def test_credentials_scope_sessions_by_default(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    # Two callers who open with the same words never share a session (DESIGN: scoped by
    # default); a caller without a credential gets the plain MD5 of the words.
    client, _ = await start(aiohttp_client, tmp_path / "s.db", session_reply)
    alice = await ask(client, chat("hello there"), "Bearer alice-key")
    mallory = await ask(client, chat("hello there", "what did I ask?"), "Bearer mallory-key")
    assert mallory["is_new"]
    assert mallory["session_id"] != alice["session_id"]
    assert alice["session_id"] == scoped_session_id("Bearer alice-key", "hello there")
    again = await ask(client, chat("hello there", "more"), "Bearer alice-key")
    assert again == {"session_id": alice["session_id"], "is_new": False}
    anonymous = await ask(client, chat("hello there"), None)
    assert anonymous["session_id"] == generate_session_id("hello there")


async def test_other_credential_headers_scope_too(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    client, _ = await start(aiohttp_client, tmp_path / "s.db", session_reply)
    ids = set()
    for header in ("api-key", "x-api-key", "x-goog-api-key", "anthropic-api-key"):
        async with client.post(PATH, json=chat("hi"), headers={header: "k-" + header}) as resp:
            ids.add((await resp.json())["session_id"])
    assert len(ids) == 4
    assert generate_session_id("hi") not in ids


async def test_scoping_can_be_turned_off(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    client, _ = await start(
        aiohttp_client, tmp_path / "s.db", session_reply, scope_by_credential=False
    )
    alice = await ask(client, chat("hello there"), "Bearer alice-key")
    mallory = await ask(client, chat("hello there", "what did I ask?"), "Bearer mallory-key")
    assert mallory == {"session_id": alice["session_id"], "is_new": False}
    assert alice["session_id"] == generate_session_id("hello there")


async def test_scope_header_keeps_upstream_chats_apart_in_the_example_proxy(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    import fake_upstream
    import proxy_server

    app = proxy_server.create_app(
        db=tmp_path / "proxy.db", config=StoreConfig(scope_header="Authorization")
    )
    client = await aiohttp_client(app)
    for key in ("alice-key", "bob-key", "alice-key"):
        async with client.post(
            PATH,
            json=chat("Tell me a secret."),
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
    chats = app[proxy_server.FAKE_UPSTREAM][fake_upstream.CHATS]
    # Each opening is a conversation of its own (nothing known precedes it): three chats,
    # and none of them holds another caller's words.
    assert len(chats) == 3
