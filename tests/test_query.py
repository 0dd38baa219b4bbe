"""The query API (query.py) on a store filled through the middleware, on every backend.

Also defines the small chat app and the conversations that fill a store (`chat_app`,
`converse`); test_cli.py fills its databases with them too.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from aiohttp_session_store import (
    SessionStore,
    StoreConfig,
    StoreError,
    get_session,
    get_store,
    mark_upstream_error,
    setup,
)
from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.hashing import scoped_session_id
from aiohttp_session_store.models import RequestQuery
from aiohttp_session_store.query import create_query_app
from aiohttp_session_store.views import exchange_json, reply_text

Client = TestClient[Any, Any]

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ISO_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")

# -- the chat app and the conversations that fill a store ------------------------------------------

HELLO = "Hello world"
STORY = "Write a haiku about the sea\nwith a second line, so that it is longer than forty"
STREAM_PIECES = ("Waves ", "fold ", "into ", "foam — ", "你好")
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


@dataclass(frozen=True)
class Filled:
    """What `converse` recorded: 7 calls in 4 sessions (plus one call without a session)."""

    # The calls carry a credential, so their ids are scoped by it (DESIGN: the default).
    hello: str = scoped_session_id("Bearer sk-secret", HELLO)
    story: str = scoped_session_id("Bearer sk-secret", STORY)
    fail: str = scoped_session_id("Bearer sk-secret", "fail upstream")
    crash: str = scoped_session_id("Bearer sk-secret", "crash")
    requests: int = 7
    sessions: int = 4


FILLED = Filled()


def _last_user(body: dict[str, Any]) -> str | None:
    for message in reversed(body.get("messages", [])):
        if message.get("role") == "user":
            text: str = message["content"]
            return text
    return None


async def chat(request: web.Request) -> web.StreamResponse:
    """A stateful-upstream-style handler: keeps chat_id/parent_id in the session."""
    body = await request.json()
    session = get_session(request)
    manager = get_store(request).manager
    if session is not None:
        if session.chat_id is None:
            await manager.set_chat_id(session.id, f"chat-{session.id[:8]}")
        await manager.update_session(session.id, f"msg-{session.message_count + 1}")
    text = _last_user(body)
    if text == "fail upstream":
        mark_upstream_error(request, "upstream returned 502")
        return web.json_response({"error": {"message": "bad gateway"}}, status=502)
    if text == "crash":
        raise RuntimeError("handler bug")
    model = body.get("model")
    if not body.get("stream"):
        reply = f"echo: {text}" if text else "no user message"
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": "stop",
                    }
                ],
                "usage": USAGE,
            }
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)

    async def send(payload: dict[str, Any]) -> None:
        chunk = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "model": model, **payload}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

    await send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    for piece in STREAM_PIECES:
        await send({"choices": [{"index": 0, "delta": {"content": piece}}]})
    await send({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    await send({"choices": [], "usage": USAGE})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def chat_app(database: str | Backend, **config: Any) -> tuple[web.Application, SessionStore]:
    app = web.Application()
    store = setup(app, database, config=StoreConfig(**config))
    app.router.add_post("/v1/chat/completions", chat)
    return app, store


def _messages(*turns: str) -> list[dict[str, str]]:
    out = [{"role": "system", "content": "Be brief."}]
    for n, text in enumerate(turns):
        if n:
            out.append({"role": "assistant", "content": f"echo: {turns[n - 1]}"})
        out.append({"role": "user", "content": text})
    return out


async def post(client: Client, model: str, *turns: str, stream: bool = False) -> int:
    body = {"model": model, "stream": stream, "messages": _messages(*turns)}
    resp = await client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-secret"}
    )
    await resp.read()
    return resp.status


async def converse(client: Client) -> None:
    """Seven calls: two JSON turns, two streamed turns, no user message, an upstream error
    and a crashing handler."""
    assert await post(client, "gpt-4o", HELLO) == 200
    assert await post(client, "gpt-4o", HELLO, "Tell me more") == 200
    assert await post(client, "qwen-max", STORY, stream=True) == 200
    assert await post(client, "qwen-max", STORY, "Another one", stream=True) == 200
    body = {"model": "gpt-4o", "messages": [{"role": "system", "content": "no user"}]}
    assert (await client.post("/v1/chat/completions", json=body)).status == 200
    assert await post(client, "gpt-4o", "fail upstream") == 502
    assert await post(client, "qwen-max", "crash") == 500


# -- fixtures --------------------------------------------------------------------------------------


@dataclass
class Admin:
    client: Client
    store: SessionStore

    async def get(self, path: str, **params: str) -> tuple[int, Any]:
        resp = await self.client.get(f"/admin{path}", params=params, headers=AUTH)
        return resp.status, await resp.json()

    async def counts(self) -> tuple[int, int, int]:
        backend = self.store.backend
        facts = await backend.response_facts(RequestQuery())
        return (
            await backend.count_sessions(),
            await backend.count_requests(RequestQuery()),
            len(facts),
        )


async def _admin(aiohttp_client: AiohttpClient, database: str | Backend) -> Admin:
    app, store = chat_app(database)
    app.add_subapp("/admin", create_query_app(store.manager, token=TOKEN, admin=True))
    client = await aiohttp_client(app)
    await converse(client)
    await store.flush()
    return Admin(client, store)


@pytest.fixture
async def admin(backend_factory: Callable[..., Backend], aiohttp_client: AiohttpClient) -> Admin:
    """A filled store on every backend. `backend_factory` comes first so that it is torn down
    last: the app must close (and commit) before a PostgreSQL test schema is dropped."""
    return await _admin(aiohttp_client, backend_factory())


@pytest.fixture
async def sqlite_admin(db_path: Path, aiohttp_client: AiohttpClient) -> Admin:
    """For what does not depend on the backend (authentication, parameter checks)."""
    return await _admin(aiohttp_client, str(db_path))


# -- construction and authentication ---------------------------------------------------------------


@pytest.mark.parametrize("token", ["", "short", " " * 20, "x" * 15, " padded-token-0123456789 "])
def test_create_query_app_refuses_weak_tokens(token: str) -> None:
    with pytest.raises(ValueError, match="token"):
        create_query_app(object(), token=token)  # type: ignore[arg-type]


ROUTES = [
    ("GET", "/sessions"),
    ("GET", f"/sessions/{FILLED.hello}"),
    ("GET", f"/sessions/{FILLED.hello}/stats"),
    ("DELETE", f"/sessions/{FILLED.hello}"),
    ("GET", "/requests"),
    ("GET", "/requests/some-id"),
    ("GET", "/responses/stats"),
]


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer wrong-token-0123456789abcdef",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        "Bearer",
        TOKEN,
    ],
)
async def test_every_route_needs_the_bearer_token(sqlite_admin: Admin, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path in ROUTES:
        resp = await sqlite_admin.client.request(method, f"/admin{path}", headers=headers)
        assert resp.status == 401, (method, path)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        body = await resp.json()
        assert body["error"]["type"] == "authentication_error"
    # Nothing was deleted by the refused DELETE.
    assert (await sqlite_admin.counts())[0] == FILLED.sessions


async def test_scheme_is_case_insensitive(sqlite_admin: Admin) -> None:
    resp = await sqlite_admin.client.get(
        "/admin/sessions", headers={"Authorization": f"bearer {TOKEN}"}
    )
    assert resp.status == 200


async def test_chat_route_is_untouched_by_the_query_app(sqlite_admin: Admin) -> None:
    # The sub-application's guard applies to its own routes only.
    assert await post(sqlite_admin.client, "gpt-4o", "no token needed here") == 200


async def test_unknown_route_and_method_give_json_errors(sqlite_admin: Admin) -> None:
    resp = await sqlite_admin.client.get("/admin/nope", headers=AUTH)
    assert resp.status == 404
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    resp = await sqlite_admin.client.post("/admin/sessions", headers=AUTH)
    assert resp.status == 405
    assert "GET" in resp.headers["Allow"]
    assert "error" in await resp.json()


# -- sessions --------------------------------------------------------------------------------------


async def test_list_sessions(admin: Admin) -> None:
    status, body = await admin.get("/sessions")
    assert status == 200
    assert body["total"] == FILLED.sessions
    assert (body["limit"], body["offset"]) == (100, 0)
    assert {s["id"] for s in body["sessions"]} == {
        FILLED.hello,
        FILLED.story,
        FILLED.fail,
        FILLED.crash,
    }
    hello = next(s for s in body["sessions"] if s["id"] == FILLED.hello)
    assert set(hello) == {
        "id",
        "chat_id",
        "parent_id",
        "first_user_message",
        "message_count",
        "created_at",
        "last_accessed",
        "expires_at",
        "expired",
    }
    assert hello["first_user_message"] == HELLO
    assert hello["chat_id"] == f"chat-{FILLED.hello[:8]}"
    assert hello["parent_id"] == "msg-2"
    assert hello["message_count"] == 2
    assert hello["expired"] is False
    for key in ("created_at", "last_accessed", "expires_at"):
        assert ISO_RE.fullmatch(hello[key]), hello[key]


async def test_list_sessions_order_paging_and_state(admin: Admin) -> None:
    _, oldest = await admin.get("/sessions", order="created_at_asc")
    _, newest = await admin.get("/sessions", order="created_at_desc")
    assert [s["id"] for s in oldest["sessions"]] == [s["id"] for s in newest["sessions"]][::-1]
    assert oldest["sessions"][0]["id"] == FILLED.hello
    _, page = await admin.get("/sessions", order="created_at_asc", limit="2", offset="1")
    assert [s["id"] for s in page["sessions"]] == [s["id"] for s in oldest["sessions"][1:3]]
    assert (page["total"], page["limit"], page["offset"]) == (FILLED.sessions, 2, 1)
    _, by_count = await admin.get("/sessions", order="message_count_desc", limit="2")
    assert {s["id"] for s in by_count["sessions"]} == {FILLED.hello, FILLED.story}
    _, active = await admin.get("/sessions", state="active")
    assert active["total"] == FILLED.sessions
    _, expired = await admin.get("/sessions", state="expired")
    assert (expired["total"], expired["sessions"]) == (0, [])


async def test_get_session_with_request_count(admin: Admin) -> None:
    status, body = await admin.get(f"/sessions/{FILLED.story}")
    assert status == 200
    assert body["id"] == FILLED.story
    assert body["first_user_message"] == STORY
    assert body["request_count"] == 2
    status, body = await admin.get("/sessions/no-such-session")
    assert status == 404
    assert body["error"]["type"] == "not_found_error"
    assert "no-such-session" in body["error"]["message"]


async def test_session_stats(admin: Admin) -> None:
    status, body = await admin.get(f"/sessions/{FILLED.hello}/stats")
    assert status == 200
    assert body["session_id"] == FILLED.hello
    assert body["requests"] == 2
    assert body["outcomes"]["completed"] == 2
    assert body["tokens"] == {"prompt": 20, "completion": 10, "total": 30}
    assert [m["model"] for m in body["by_model"]] == ["gpt-4o"]
    status, body = await admin.get(f"/sessions/{FILLED.hello}/stats", until="2000-01-01")
    assert (status, body["requests"]) == (200, 0)
    status, _ = await admin.get("/sessions/nobody/stats")
    assert status == 404


async def test_delete_session_keeps_its_records(admin: Admin) -> None:
    resp = await admin.client.delete(f"/admin/sessions/{FILLED.hello}", headers=AUTH)
    assert resp.status == 200
    assert await resp.json() == {"id": FILLED.hello, "deleted": True}
    # Visible at once: the delete was committed before the reply.
    status, _ = await admin.get(f"/sessions/{FILLED.hello}")
    assert status == 404
    assert await admin.store.backend.get_session(FILLED.hello) is None
    _, body = await admin.get("/requests", session_id=FILLED.hello)
    assert body["total"] == 2
    # Stats of a deleted session's records are still there.
    status, body = await admin.get(f"/sessions/{FILLED.hello}/stats")
    assert (status, body["requests"]) == (200, 2)
    resp = await admin.client.delete(f"/admin/sessions/{FILLED.hello}", headers=AUTH)
    assert resp.status == 404
    assert (await admin.counts())[0] == FILLED.sessions - 1


# -- requests --------------------------------------------------------------------------------------


async def test_list_requests(admin: Admin) -> None:
    status, body = await admin.get("/requests")
    assert status == 200
    assert body["total"] == FILLED.requests
    assert len(body["requests"]) == FILLED.requests
    first = body["requests"][-1]  # newest first: the very first call is last
    assert set(first) == {
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
    assert first["session_id"] == FILLED.hello
    assert first["user_message"] == HELLO
    assert first["response"]["reply"] == f"echo: {HELLO}"
    assert first["response"]["outcome"] == "completed"
    assert first["response"]["total_tokens"] == 15
    assert "openai_request" not in first  # bodies only on the single-request route
    _, oldest = await admin.get("/requests", order="oldest")
    assert oldest["requests"][0]["request_id"] == first["request_id"]


REQUEST_FILTERS: list[tuple[dict[str, str], int]] = [
    ({"session_id": FILLED.story}, 2),
    ({"model": "qwen-max"}, 3),
    ({"model": "gpt-4o"}, 4),
    ({"model": "gpt-4o", "session_id": FILLED.hello}, 2),
    ({"stream": "true"}, 2),
    ({"stream": "false"}, 5),
    ({"since": "1h"}, 7),
    ({"since": "2000-01-01"}, 7),
    ({"until": "1h"}, 0),
    ({"until": "2000-01-01T00:00:00Z"}, 0),
    ({"since": "2099-01-01"}, 0),
    ({"limit": "2"}, 7),
    ({"limit": "2", "offset": "6"}, 7),
]


async def test_request_filters(admin: Admin) -> None:
    for params, expected in REQUEST_FILTERS:
        status, body = await admin.get("/requests", **params)
        assert status == 200, params
        assert body["total"] == expected, params
        shown = min(expected - int(params.get("offset", 0)), int(params.get("limit", 100)))
        assert len(body["requests"]) == shown, params


async def test_get_request_with_its_response_and_bodies(admin: Admin) -> None:
    _, listing = await admin.get("/requests", session_id=FILLED.story, order="oldest")
    request_id = listing["requests"][0]["request_id"]
    status, body = await admin.get(f"/requests/{request_id}")
    assert status == 200
    assert body["request_id"] == request_id
    assert body["stream"] is True
    # Bodies are JSON values, not JSON text inside JSON.
    assert body["openai_request"]["messages"][-1]["content"] == STORY
    assert body["headers"]["Authorization"] == "[REDACTED]"
    response = body["response"]
    assert response["reply"] == "".join(STREAM_PIECES)
    assert response["finish_reason"] == "stop"
    assert response["openai_response"]["object"] == "chat.completion"
    assert response["first_byte_ms"] is not None
    status, body = await admin.get("/requests/nope")
    assert (status, body["error"]["type"]) == (404, "not_found_error")


async def test_error_outcomes_are_visible(admin: Admin) -> None:
    _, fail = await admin.get("/requests", session_id=FILLED.fail)
    response = fail["requests"][0]["response"]
    assert (response["outcome"], response["status_code"]) == ("upstream_error", 502)
    assert response["error"] == "upstream returned 502"
    _, crash = await admin.get("/requests", session_id=FILLED.crash)
    response = crash["requests"][0]["response"]
    # (Its status_code is the middleware's business: aiohttp, not the handler, sent the 500.)
    assert response["outcome"] == "handler_error"
    assert "handler bug" in response["error"]


# -- statistics ------------------------------------------------------------------------------------


async def test_response_stats_overall_and_filtered(admin: Admin) -> None:
    status, body = await admin.get("/responses/stats")
    assert status == 200
    assert body["requests"] == FILLED.requests
    assert body["outcomes"] == {
        "completed": 5,
        "client_disconnected": 0,
        "upstream_error": 1,
        "handler_error": 1,
    }
    assert body["tokens"] == {"prompt": 50, "completion": 25, "total": 75}
    assert body["duration_ms"]["p50"] is not None
    by_model = {m["model"]: m for m in body["by_model"]}
    assert list(by_model) == ["gpt-4o", "qwen-max"]
    assert by_model["gpt-4o"]["requests"] == 4
    assert by_model["gpt-4o"]["outcomes"]["upstream_error"] == 1
    assert by_model["qwen-max"]["outcomes"]["handler_error"] == 1
    assert by_model["qwen-max"]["tokens"]["total"] == 30
    _, one = await admin.get("/responses/stats", session_id=FILLED.story)
    assert (one["requests"], one["tokens"]["total"]) == (2, 30)
    _, streamed = await admin.get("/responses/stats", stream="true", model="qwen-max")
    assert streamed["requests"] == 2
    _, none = await admin.get("/responses/stats", since="2099-01-01T00:00Z")
    assert none["requests"] == 0
    assert none["duration_ms"] == {"p50": None, "p95": None}


# -- bad parameters and SQL injection --------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "fragment"),
    [
        ("/sessions", {"limit": "0"}, "between 1 and 1000"),
        ("/sessions", {"limit": "1001"}, "between 1 and 1000"),
        ("/sessions", {"limit": "-1"}, "integer"),
        ("/sessions", {"limit": "ten"}, "integer"),
        ("/sessions", {"limit": "+5"}, "integer"),
        ("/sessions", {"limit": "1e3"}, "integer"),
        ("/sessions", {"limit": "99999999999999999999"}, "integer"),
        ("/sessions", {"offset": "-1"}, "integer"),
        ("/sessions", {"order": "id"}, "order"),
        ("/sessions", {"state": "dead"}, "state"),
        ("/sessions", {"sort": "created_at_desc"}, "unknown parameter"),
        ("/requests", {"stream": "yes"}, "true or false"),
        ("/requests", {"since": "yesterday"}, "since"),
        ("/requests", {"until": "2026-13-01"}, "until"),
        ("/requests", {"session": "x"}, "unknown parameter"),
        ("/requests", {"model": ""}, "empty"),
        ("/requests", {"order": "random"}, "order"),
        ("/responses/stats", {"limit": "5"}, "unknown parameter"),
        (f"/sessions/{FILLED.hello}", {"x": "1"}, "unknown parameter"),
    ],
)
async def test_bad_parameters_are_400(
    sqlite_admin: Admin, path: str, params: dict[str, str], fragment: str
) -> None:
    status, body = await sqlite_admin.get(path, **params)
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert fragment in body["error"]["message"]


async def test_repeated_parameter_is_400(sqlite_admin: Admin) -> None:
    resp = await sqlite_admin.client.get("/admin/sessions?limit=1&limit=2", headers=AUTH)
    assert resp.status == 400
    assert "more than once" in (await resp.json())["error"]["message"]


INJECTIONS = [
    "' OR 1=1 --",
    "x' OR '1'='1",
    '"; DROP TABLE sessions; --',
    "1; DELETE FROM requests",
    "') UNION SELECT id, id, id FROM sessions --",
    "%' OR ''='",
    "created_at_desc; DROP TABLE responses",
]


async def test_sql_injection_in_every_filter(admin: Admin) -> None:
    before = await admin.counts()
    for payload in INJECTIONS:
        await _inject(admin, payload)
    # Every table is still there, with every row.
    assert await admin.counts() == before


async def _inject(admin: Admin, payload: str) -> None:
    for path in ("/requests", "/responses/stats"):
        for name in ("session_id", "model"):
            status, body = await admin.get(path, **{name: payload})
            assert status == 200, body
            assert body.get("total", body.get("requests")) == 0
    for path, name in [
        ("/sessions", "limit"),
        ("/sessions", "offset"),
        ("/sessions", "order"),
        ("/sessions", "state"),
        ("/requests", "stream"),
        ("/requests", "since"),
        ("/requests", "until"),
        ("/requests", "limit"),
        ("/requests", "offset"),
        ("/requests", "order"),
        ("/responses/stats", "stream"),
        ("/responses/stats", "since"),
        ("/responses/stats", "until"),
        (f"/sessions/{FILLED.hello}/stats", "since"),
    ]:
        status, body = await admin.get(path, **{name: payload})
        assert status == 400, (path, name, body)
    for path in ("/sessions/{}", "/sessions/{}/stats", "/requests/{}"):
        resp = await admin.client.get("/admin" + path.format(_quote(payload)), headers=AUTH)
        assert resp.status == 404
    resp = await admin.client.delete(f"/admin/sessions/{_quote(payload)}", headers=AUTH)
    assert resp.status == 404


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


# -- consistency with the writer, and failures -----------------------------------------------------


async def test_new_records_appear_within_the_flush_interval(admin: Admin) -> None:
    # Reads never wait for the writer; they see a finished call once it is committed.
    assert await post(admin.client, "gpt-4o", "one more") == 200
    deadline = time.monotonic() + 2.0
    while True:
        _, body = await admin.get("/requests")
        if body["total"] == FILLED.requests + 1:
            break
        assert time.monotonic() < deadline, "record not visible within 2 s"
        await asyncio.sleep(0.01)


async def test_store_failure_is_503(sqlite_admin: Admin, monkeypatch: pytest.MonkeyPatch) -> None:
    async def broken(*args: object, **kwargs: object) -> None:
        raise StoreError("disk on fire")

    monkeypatch.setattr(sqlite_admin.store.backend, "list_sessions", broken)
    status, body = await sqlite_admin.get("/sessions")
    assert status == 503
    assert body["error"]["type"] == "server_error"
    assert "disk on fire" not in body["error"]["message"]


def test_reply_text_shapes() -> None:
    assert reply_text(None) is None
    assert reply_text("not json") is None
    assert reply_text('{"error": {"message": "boom"}}') == "[error] boom"
    tool = {
        "choices": [
            {
                "message": {
                    "content": None,
                    "tool_calls": [{"function": {"name": "get", "arguments": '{"a":1}'}}],
                }
            }
        ]
    }
    assert reply_text(json.dumps(tool)) == '[tool calls] get({"a":1})'
    parts = {"choices": [{"message": {"content": [{"type": "text", "text": "a"}]}}]}
    assert reply_text(json.dumps(parts)) == "a"


async def test_exchange_json_of_request_in_flight(sqlite_admin: Admin) -> None:
    exchanges = await sqlite_admin.store.backend.list_exchanges(RequestQuery(limit=1))
    pending = exchange_json(type(exchanges[0])(request=exchanges[0].request, response=None))
    assert pending["response"] is None


async def test_store_query_app_mounts(
    aiohttp_client: AiohttpClient, backend_factory: Callable[..., Backend]
) -> None:
    app, store = chat_app(backend_factory())
    app.add_subapp("/admin", store.query_app(token=TOKEN))
    client = await aiohttp_client(app)
    assert await post(client, "gpt-4o", HELLO) == 200
    await store.flush()
    resp = await client.get("/admin/sessions", headers=AUTH)
    assert resp.status == 200
    assert (await resp.json())["total"] == 1


@pytest.mark.parametrize("admin", [False, True])
async def test_delete_is_an_admin_route(
    aiohttp_client: AiohttpClient, db_path: Path, admin: bool
) -> None:
    app, store = chat_app(str(db_path))
    app.add_subapp("/admin", store.query_app(token=TOKEN, admin=admin))
    client = await aiohttp_client(app)
    assert await post(client, "gpt-4o", HELLO) == 200
    await store.flush()
    session_id = scoped_session_id("Bearer sk-secret", HELLO)
    resp = await client.delete(f"/admin/sessions/{session_id}", headers=AUTH)
    if admin:
        assert resp.status == 200
        assert await store.backend.get_session(session_id) is None
        return
    # Read-only by default: the route is not served, and nothing was deleted.
    assert resp.status == 405
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    assert "DELETE" not in resp.headers["Allow"]
    assert await store.backend.get_session(session_id) is not None
    # Still behind the token, like every route.
    assert (await client.delete(f"/admin/sessions/{session_id}")).status == 401


# -- the conversation tree -------------------------------------------------------------------------


async def test_session_tree_of_a_conversation_driven_through_the_example_proxy(
    backend_factory: Callable[..., Backend],
) -> None:
    import aiohttp
    from branched import TOKEN as PROXY_TOKEN
    from branched import record_branched, running_proxy

    async with running_proxy(backend_factory()) as proxy:
        recorded = await record_branched(proxy)
        auth = {"Authorization": f"Bearer {PROXY_TOKEN}"}
        async with aiohttp.ClientSession(headers=auth) as http:
            base = f"{proxy.root}/admin/sessions"
            async with http.get(f"{base}/{recorded.session_id}/tree") as resp:
                assert resp.status == 200
                tree = await resp.json()
            async with http.get(f"{base}/no-such-session/tree") as resp:
                assert resp.status == 404
            async with http.get(f"{base}/{recorded.session_id}/tree?x=1") as resp:
                assert resp.status == 400
    assert tree["session_id"] == recorded.session_id
    nodes = {n["hash"]: n for n in tree["nodes"]}
    assert len(nodes) == 6  # six completed calls; the disconnected one made no node
    (root,) = tree["roots"]
    users = {h: n["user_message"] for h, n in nodes.items()}
    # hi -> {joke, joke again -> tool call -> tool answer, edited}
    assert users[root] == "hi"
    assert sorted(users[c] for c in nodes[root]["children"]) == [
        "Tell me a joke.",
        "Tell me a joke.",
        "What is 2+2?",
    ]
    assert tree["branch_points"] == 1
    assert [users[h] for h in tree["active_path"]] == ["hi", "What is 2+2?"]
    assert [n["active"] for n in tree["nodes"]].count(True) == 2
    replies = {n["reply"] for n in tree["nodes"]}
    assert {recorded.replies["joke"], recorded.replies["joke_again"]} <= replies
    assert all(n["request_id"] and n["response_id"] for n in tree["nodes"])
    # Reading order is the tree's: every node comes after its parent.
    order = [n["hash"] for n in tree["nodes"]]
    assert all(
        order.index(n["parent_hash"]) < order.index(h) for h, n in nodes.items() if h != root
    )


# -- search and id prefixes ------------------------------------------------------------------------


async def test_search_requests_with_q(admin: Admin) -> None:
    status, body = await admin.get("/requests", q="haiku")
    assert status == 200
    assert [r["session_id"] for r in body["requests"]] == [FILLED.story]  # the first turn only
    assert "«haiku»" in body["requests"][0]["snippet"]
    assert (body["total"], body["offset"]) == (None, 0)
    status, body = await admin.get("/requests", q="foam")  # streamed replies, assembled
    assert [r["session_id"] for r in body["requests"]] == [FILLED.story] * 2
    status, body = await admin.get("/requests", q="bad gateway")  # an error body's message
    assert [r["session_id"] for r in body["requests"]] == [FILLED.fail]
    status, body = await admin.get("/requests", q="more", session_id=FILLED.story[:8])
    assert (status, body["requests"]) == (200, [])
    status, body = await admin.get("/requests", q="more", session_id=FILLED.hello[:8])
    assert [r["user_message"] for r in body["requests"]] == ["Tell me more"]
    status, body = await admin.get("/requests", q='NEAR("', limit="1")
    assert (status, body["requests"]) == (200, [])  # syntax is text: "near" matches nothing


async def test_search_sessions_with_q(admin: Admin) -> None:
    status, body = await admin.get("/sessions", q="echo")
    assert status == 200
    assert [s["id"] for s in body["sessions"]] == [FILLED.hello]  # two matching calls, one row
    assert body["sessions"][0]["first_user_message"] == HELLO
    assert "«echo»" in body["sessions"][0]["match"]["snippet"]


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"q": '"'}, "no words"),
        ({"q": ""}, "empty"),
        ({"q": "x", "model": "m"}, "unknown parameter 'model'"),
        ({"q": "x", "offset": "5"}, "unknown parameter 'offset'"),
    ],
)
async def test_bad_search_is_400(sqlite_admin: Admin, params: dict[str, str], word: str) -> None:
    for path in ("/requests", "/sessions"):
        status, body = await sqlite_admin.get(path, **params)
        if path == "/sessions" and "model" in params:
            word = "unknown parameter 'model'"
        assert status == 400, (path, params)
        assert word in body["error"]["message"]


async def test_ids_take_a_prefix(admin: Admin) -> None:
    status, body = await admin.get(f"/sessions/{FILLED.story[:6]}")
    assert (status, body["id"]) == (200, FILLED.story)
    status, body = await admin.get(f"/sessions/{FILLED.story[:6]}/stats")
    assert (status, body["session_id"]) == (200, FILLED.story)
    status, body = await admin.get("/requests", session_id=FILLED.hello[:5])
    assert {r["session_id"] for r in body["requests"]} == {FILLED.hello}
    request_id = body["requests"][0]["request_id"]
    status, body = await admin.get(f"/requests/{request_id[:12]}")
    assert (status, body["request_id"]) == (200, request_id)


async def test_ambiguous_prefix_is_400_naming_the_candidates(admin: Admin) -> None:
    backend = admin.store.backend
    from aiohttp_session_store.models import Session, WriteBatch

    await backend.write_batch(
        WriteBatch(sessions=[Session(i, None, None, "x", 0, 1, 1, 2) for i in ("zz-1", "zz-2")])
    )
    for path in ("/sessions/zz", "/sessions/zz/stats"):
        status, body = await admin.get(path)
        assert status == 400
        assert "ambiguous" in body["error"]["message"]
        assert "zz-1, zz-2" in body["error"]["message"]
    status, body = await admin.get("/requests", session_id="zz")
    assert status == 400
