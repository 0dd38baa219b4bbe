"""The middleware before and around the handler: which calls it touches, sessions, records."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from proxy_apps import (
    CHAT_PATH,
    MODEL,
    Handler,
    assert_one_response_per_request,
    chat_body,
    completion,
    db_file_bytes,
    dechunk,
    exchanges,
    fetch_raw,
    json_handler,
    make_app,
    md5,
    raw_request,
    split_response,
    stateful_proxy,
    wait_for_responses,
)

from aiohttp_session_store import (
    SessionStore,
    StoreConfig,
    get_session,
    get_store,
    set_upstream,
    setup,
)
from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.backends.sqlite import SQLiteBackend
from aiohttp_session_store.models import WriteBatch

# Every test here runs with the loop in debug mode (conftest.debug_loop).
pytestmark = pytest.mark.usefixtures("debug_loop")

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


async def session_echo(request: web.Request) -> web.StreamResponse:
    """Says which session the middleware resolved, and reads the body again."""
    body = await request.read()
    session = get_session(request)
    return web.json_response(
        {
            "session_id": session.id if session else None,
            "is_new": session.is_new if session else None,
            "first_user_message": session.first_user_message if session else None,
            "body_len": len(body),
        }
    )


async def start(
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    routes: dict[str, Handler] | Handler = session_echo,
    *,
    database: Backend | None = None,
    **config: Any,
) -> tuple[Client, SessionStore]:
    app = web.Application()
    table = {CHAT_PATH: routes} if callable(routes) else dict(routes)
    for path, handler in table.items():
        app.router.add_route("*", path, handler)
    store = setup(app, database or tmp_path / "s.db", config=StoreConfig(**config))
    return await aiohttp_client(app), store


# -- which calls are touched -----------------------------------------------------------------


async def test_other_paths_pass_through_untouched(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    async def upload(request: web.Request) -> web.StreamResponse:
        # Reads the body as a stream: had the middleware consumed it, this would be empty.
        parts = []
        while chunk := await request.content.read(7):
            parts.append(chunk)
        seen["body"] = b"".join(parts)
        seen["session"] = get_session(request)
        with pytest.raises(RuntimeError):
            set_upstream(request, request_body={"x": 1})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        # No tee on this response: its write is the class's own method.
        seen["tee"] = "write" in vars(resp)
        await resp.write(b"data: hi\n\n")
        await resp.write_eof()
        return resp

    client, store = await start(
        aiohttp_client, tmp_path, {"/upload": upload, CHAT_PATH: session_echo}
    )
    payload = json.dumps(chat_body("Hello world")).encode()
    resp = await client.post("/upload", data=payload, headers={"X-Session-Id": "not valid!"})
    assert resp.status == 200  # an invalid session header is not even looked at here
    assert await resp.read() == b"data: hi\n\n"
    assert seen == {"body": payload, "session": None, "tee": False}
    assert await exchanges(store) == []
    assert await store.manager.get_all_sessions() == []


async def test_unrecorded_chat_completions_post_is_warned_about_once(
    aiohttp_client: ClientFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client, store = await start(
        aiohttp_client,
        tmp_path,
        {"/sse/v1/chat/completions": session_echo, "/other": session_echo, CHAT_PATH: session_echo},
    )
    caplog.set_level("WARNING", logger="aiohttp_session_store.middleware")
    body = chat_body("Hello world")
    assert (await client.post("/other", json=body)).status == 200
    assert (await client.get("/sse/v1/chat/completions")).status == 200
    assert caplog.records == []  # neither a chat path nor a POST: nothing to say
    for _ in range(3):
        assert (await client.post("/sse/v1/chat/completions", json=body)).status == 200
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "'/sse/v1/chat/completions'" in warnings[0]
    assert "StoreConfig.paths" in warnings[0]
    assert await exchanges(store) == []  # still passed through unrecorded


# -- session ids -------------------------------------------------------------------------------


async def test_session_derived_from_first_user_message(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client, store = await start(aiohttp_client, tmp_path)
    first = await (await client.post(CHAT_PATH, json=chat_body("Hello world"))).json()
    assert first["session_id"] == "3e25960a79dbc69b674cd4ec67a72c62"
    assert first["is_new"] is True
    assert first["first_user_message"] == "Hello world"
    # The next turn resends the history: same first user message, same session, not new.
    body = chat_body("Hello world")
    body["messages"] += [
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "And then?"},
    ]
    second = await (await client.post(CHAT_PATH, json=body)).json()
    assert second["session_id"] == first["session_id"]
    assert second["is_new"] is False
    sessions = await store.manager.get_all_sessions()
    assert [sid for sid, _ in sessions] == [first["session_id"]]


@pytest.mark.parametrize(
    ("content", "text"),
    [
        ("  Hello world \n", "  Hello world \n"),  # never trimmed
        (
            [
                {"type": "text", "text": "Hello"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "world"},
            ],
            "Hello\nworld",
        ),
        ([{"type": "text", "text": "only part"}], "only part"),
        ("héllo 你好 🙂", "héllo 你好 🙂"),
    ],
)
async def test_session_id_rule(
    aiohttp_client: ClientFactory, tmp_path: Path, content: Any, text: str
) -> None:
    client, _ = await start(aiohttp_client, tmp_path)
    body = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "assistant", "content": "I speak first"},
            {"role": "user", "content": content},
            {"role": "user", "content": "a later user message is not the key"},
        ],
    }
    got = await (await client.post(CHAT_PATH, json=body)).json()
    assert got["session_id"] == md5(text)
    assert got["first_user_message"] == text


@pytest.mark.parametrize(
    "raw",
    [
        b"this is not json{",
        b"",
        b"[1, 2, 3]",
        json.dumps({"model": MODEL, "messages": [{"role": "system", "content": "s"}]}).encode(),
        json.dumps({"model": MODEL, "messages": "Hello"}).encode(),
        json.dumps({"model": MODEL, "messages": [{"role": "user", "content": ""}]}).encode(),
    ],
    ids=["not-json", "empty", "json-list", "no-user", "messages-not-list", "empty-user"],
)
async def test_no_user_message_no_session_still_served_and_recorded(
    aiohttp_client: ClientFactory, tmp_path: Path, raw: bytes
) -> None:
    client, store = await start(aiohttp_client, tmp_path)
    resp = await client.post(CHAT_PATH, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 200
    got = await resp.json()
    assert got["session_id"] is None
    assert got["body_len"] == len(raw)  # the handler read the whole body again
    (ex,) = await exchanges(store)
    assert ex.request.session_id is None
    if raw:
        assert ex.request.openai_request == raw.decode()
    else:
        assert ex.request.openai_request in ("", None)
    assert ex.response is not None
    assert ex.response.status_code == 200
    assert ex.response.outcome == "completed"
    assert ex.response.session_id is None
    assert await store.manager.get_all_sessions() == []


async def test_expired_session_is_created_anew_and_keeps_its_records(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    # A sweep interval no test reaches: the expiry is seen when the session is resolved.
    client, store = await start(aiohttp_client, tmp_path, session_timeout=0.1, sweep_interval=600)
    first = await (await client.post(CHAT_PATH, json=chat_body("Hello world"))).json()
    await asyncio.sleep(0.15)
    again = await (await client.post(CHAT_PATH, json=chat_body("Hello world"))).json()
    assert first["is_new"] is True
    assert again["is_new"] is True
    assert again["session_id"] == first["session_id"]
    recorded = await exchanges(store)
    assert [e.request.session_id for e in recorded] == [md5("Hello world")] * 2
    assert all(e.response is not None for e in recorded)


async def test_valid_session_header_wins(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    client, store = await start(aiohttp_client, tmp_path)
    chosen = "conv-2024.01:abc_" + "x" * (128 - 17)
    assert len(chosen) == 128
    resp = await client.post(
        CHAT_PATH, json=chat_body("Hello world"), headers={"X-Session-Id": chosen}
    )
    got = await resp.json()
    assert got["session_id"] == chosen
    assert got["is_new"] is True
    # A chosen id needs no user message.
    resp = await client.post(CHAT_PATH, data=b"not json", headers={"X-Session-Id": chosen})
    got = await resp.json()
    assert got["session_id"] == chosen
    assert got["is_new"] is False
    sessions = await store.manager.get_all_sessions()
    assert [sid for sid, _ in sessions] == [chosen]
    recorded = await exchanges(store)
    assert [e.request.session_id for e in recorded] == [chosen, chosen]


async def test_session_header_name_is_configurable(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client, _ = await start(aiohttp_client, tmp_path, session_header="X-Conversation")
    got = await (
        await client.post(CHAT_PATH, json=chat_body(), headers={"X-Conversation": "mine"})
    ).json()
    assert got["session_id"] == "mine"
    # The default name means nothing now: the body decides.
    got = await (
        await client.post(CHAT_PATH, json=chat_body(), headers={"X-Session-Id": "bad id!"})
    ).json()
    assert got["session_id"] == md5("Hello world")


@pytest.mark.parametrize(
    "value",
    ["has space", "x" * 129, "", "semi;colon", "slash/y", "héllo"],
    ids=["space", "too-long", "empty", "semicolon", "slash", "non-ascii"],
)
async def test_invalid_session_header_is_400_json_and_recorded(
    aiohttp_client: ClientFactory, tmp_path: Path, value: str
) -> None:
    ran = False

    async def handler(request: web.Request) -> web.StreamResponse:
        nonlocal ran
        ran = True
        return web.json_response({})

    client, store = await start(aiohttp_client, tmp_path, handler)
    body = json.dumps(chat_body("Hello world")).encode()
    # Raw bytes: the client library would refuse some of these header values itself.
    port = client.server.port
    assert isinstance(port, int)
    raw = await fetch_raw(
        client.server.host, port, raw_request(CHAT_PATH, body, headers={"X-Session-Id": value})
    )
    status, headers, wire_body = split_response(raw)
    assert b" 400 " in status
    assert any(h.lower().startswith(b"content-type: application/json") for h in headers)
    chunked = any(h.lower() == b"transfer-encoding: chunked" for h in headers)
    payload = dechunk(wire_body) if chunked else wire_body
    error = json.loads(payload)
    assert isinstance(error["error"]["message"], str)
    assert "X-Session-Id" in error["error"]["message"]
    assert not ran
    (ex,) = await exchanges(store)
    assert ex.request.session_id is None
    assert ex.response is not None
    assert ex.response.status_code == 400
    assert await store.manager.get_all_sessions() == []


@pytest.mark.parametrize("durability", ["batched", "sync"])
async def test_concurrent_first_requests_create_one_session(
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    backend_factory: Callable[..., Backend],
    durability: str,
) -> None:
    async def advancing(request: web.Request) -> web.StreamResponse:
        session = get_session(request)
        assert session is not None
        await get_store(request).manager.update_session(session.id, "p")
        return web.json_response({"is_new": session.is_new})

    client, store = await start(
        aiohttp_client, tmp_path, advancing, database=backend_factory(), durability=durability
    )
    n = 20
    replies = await asyncio.gather(
        *(client.post(CHAT_PATH, json=chat_body("same opening words")) for _ in range(n))
    )
    flags = [(await r.json())["is_new"] for r in replies]
    assert flags.count(True) == 1
    await store.flush()
    rows = await store.manager.get_all_sessions()
    assert len(rows) == 1
    assert rows[0][1].message_count == n  # no increment lost


# -- the request record --------------------------------------------------------------------


async def test_request_record_holds_the_call_as_received(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client, store = await start(aiohttp_client, tmp_path, json_handler(completion("ok")))
    # Odd spacing, key order and escapes: the record is the body as received, not re-encoded.
    raw = (
        '{ "stream" : true,\n "model":"gpt-x", "messages":[{"role":"user",'
        '"content":"caf\\u00e9 \u00e9"}] , "temperature": 0.50 }'
    ).encode()
    resp = await client.put(
        CHAT_PATH + "?trace=1",
        data=raw,
        headers={"Content-Type": "application/json", "X-Request-Tag": "tag-7"},
    )
    assert resp.status == 200
    (ex,) = await exchanges(store)
    req = ex.request
    assert req.method == "PUT"
    assert req.path == CHAT_PATH
    assert req.model == "gpt-x"
    assert req.stream is True
    assert req.openai_request == raw.decode()
    assert req.session_id == md5("café é")
    assert req.request_id
    assert ex.response is not None
    assert ex.response.request_id == req.request_id
    assert ex.response.session_id == req.session_id
    headers = json.loads(req.headers or "")
    assert headers["X-Request-Tag"] == "tag-7"
    assert headers["Content-Type"] == "application/json"
    assert req.timestamp > 1_600_000_000_000  # epoch milliseconds


@pytest.mark.parametrize(("stream", "expected"), [(False, False), ("yes", False), (None, False)])
async def test_stream_flag_is_true_only_for_true(
    aiohttp_client: ClientFactory, tmp_path: Path, stream: Any, expected: bool
) -> None:
    client, store = await start(aiohttp_client, tmp_path, json_handler(completion("ok")))
    await client.post(CHAT_PATH, json={**chat_body(), "stream": stream})
    (ex,) = await exchanges(store)
    assert ex.request.stream is expected


async def test_request_record_is_queued_before_the_handler_runs(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    seen: list[Any] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        store = get_store(request)
        found = await exchanges(store)
        seen.extend((e.request.session_id, e.response) for e in found)
        return web.json_response(completion("ok"))

    client, store = await start(aiohttp_client, tmp_path, handler)
    await client.post(CHAT_PATH, json=chat_body("Hello world"))
    assert seen == [(md5("Hello world"), None)]
    (ex,) = await exchanges(store)
    assert ex.response is not None


async def test_redacted_headers_never_reach_the_database(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    secrets = {
        "Authorization": "Bearer sk-test-SECRET-0123456789",
        "Cookie": "sid=COOKIE-SECRET-42",
        "x-api-key": "APIKEY-SECRET-777",  # matched whatever its case
        "Proxy-Authorization": "Basic UFJPWFktU0VDUkVU",
    }
    app, store = make_app(
        stateful_proxy, db=tmp_path / "s.db", config=StoreConfig(durability="batched")
    )
    assert store is not None
    client = await aiohttp_client(app)
    for stream in (False, True):
        resp = await client.post(
            CHAT_PATH,
            json=chat_body("Hello world", stream=stream),
            headers={**secrets, "X-Visible": "plain-value"},
        )
        assert resp.status == 200
        await resp.read()
    recorded = await exchanges(store)
    assert len(recorded) == 2
    for ex in recorded:
        headers = json.loads(ex.request.headers or "")
        lowered = {k.lower(): v for k, v in headers.items()}
        for name in secrets:
            assert lowered[name.lower()] == "[REDACTED]"
        assert lowered["x-visible"] == "plain-value"
    await client.close()
    data = db_file_bytes(tmp_path / "s.db")
    assert b"plain-value" in data  # the rows really are in these bytes
    for value in secrets.values():
        assert value.encode() not in data
    assert b"SECRET" not in data


async def test_long_request_body_stored_truncated_and_marked(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen["body"] = await request.json()
        session = get_session(request)
        seen["session"] = session.id if session else None
        return web.json_response(completion("ok"))

    client, store = await start(aiohttp_client, tmp_path, handler, max_body_bytes=100)
    body = chat_body("x" * 2000)
    raw = json.dumps(body).encode()
    await client.post(CHAT_PATH, data=raw, headers={"Content-Type": "application/json"})
    # The handler got all of it, and the session is keyed on the whole message.
    assert seen == {"body": body, "session": md5("x" * 2000)}
    (ex,) = await exchanges(store)
    stored = ex.request.openai_request
    assert stored is not None
    assert stored != raw.decode()
    marked = json.loads(stored)
    assert marked["truncated"] is True
    assert marked["original_bytes"] == len(raw)
    assert marked["prefix"] == raw[:100].decode()


async def test_small_body_under_the_limit_is_stored_whole(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client, store = await start(
        aiohttp_client, tmp_path, json_handler(completion("ok")), max_body_bytes=4096
    )
    raw = json.dumps(chat_body("short")).encode()
    await client.post(CHAT_PATH, data=raw, headers={"Content-Type": "application/json"})
    (ex,) = await exchanges(store)
    assert ex.request.openai_request == raw.decode()


# -- the response record: JSON replies, HTTP errors, exceptions -------------------------------


async def test_json_reply_recorded_as_sent(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    reply = completion(
        "Bonjour 🙂",
        finish_reason="length",
        usage={"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    )
    client, store = await start(aiohttp_client, tmp_path, json_handler(reply))
    resp = await client.post(CHAT_PATH, json=chat_body())
    sent = await resp.read()
    assert json.loads(sent) == reply
    (ex,) = await exchanges(store)
    r = ex.response
    assert r is not None
    assert r.status_code == 200
    assert r.outcome == "completed"
    assert r.openai_response == sent.decode()
    assert (r.prompt_tokens, r.completion_tokens, r.total_tokens) == (11, 7, 18)
    assert r.finish_reason == "length"
    assert r.error is None
    assert r.duration_ms >= 0
    assert r.first_byte_ms is None or 0 <= r.first_byte_ms <= r.duration_ms


async def test_long_json_reply_stored_truncated_and_marked(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    reply = completion("y" * 5000)
    client, store = await start(aiohttp_client, tmp_path, json_handler(reply), max_body_bytes=300)
    sent = await (await client.post(CHAT_PATH, json=chat_body())).read()
    assert json.loads(sent) == reply  # the client is never cut
    (ex,) = await exchanges(store)
    assert ex.response is not None
    marked = json.loads(ex.response.openai_response or "")
    assert marked["truncated"] is True
    assert marked["original_bytes"] == len(sent)
    assert marked["prefix"] == sent[:300].decode()


async def test_json_reply_zero_usage_stays_zero(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    reply = completion("", usage={"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    client, store = await start(aiohttp_client, tmp_path, json_handler(reply))
    await client.post(CHAT_PATH, json=chat_body())
    (ex,) = await exchanges(store)
    assert ex.response is not None
    assert (ex.response.prompt_tokens, ex.response.completion_tokens, ex.response.total_tokens) == (
        0,
        0,
        0,
    )


async def test_json_reply_that_is_not_a_completion(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client, store = await start(
        aiohttp_client, tmp_path, json_handler({"hello": [1, 2]}, status=202)
    )
    await client.post(CHAT_PATH, json=chat_body())
    (ex,) = await exchanges(store)
    r = ex.response
    assert r is not None
    assert r.status_code == 202
    assert json.loads(r.openai_response or "") == {"hello": [1, 2]}
    assert (r.prompt_tokens, r.total_tokens, r.finish_reason) == (None, None, None)


async def test_upstream_error_passed_on_as_json_is_recorded(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    error = {"error": {"message": "rate limited upstream", "type": "rate_limit", "code": 429}}
    client, store = await start(aiohttp_client, tmp_path, json_handler(error, status=429))
    resp = await client.post(CHAT_PATH, json=chat_body())
    assert resp.status == 429
    (ex,) = await exchanges(store)
    assert ex.response is not None
    assert ex.response.status_code == 429
    assert json.loads(ex.response.openai_response or "") == error


def outer_catcher(caught: list[BaseException]) -> Any:
    """A middleware outside the store's: proves the store re-raises what the handler raised."""

    @web.middleware
    async def catcher(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BaseException as exc:
            caught.append(exc)
            raise

    return catcher


@pytest.mark.parametrize(
    "exc_type", [web.HTTPBadRequest, web.HTTPTooManyRequests, web.HTTPBadGateway]
)
async def test_http_exception_recorded_with_status_and_text_then_reraised(
    aiohttp_client: ClientFactory, tmp_path: Path, exc_type: type[web.HTTPException]
) -> None:
    text = json.dumps({"error": {"message": f"nope {exc_type.status_code}"}})

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        raise exc_type(text=text, content_type="application/json")

    caught: list[BaseException] = []
    app, store = make_app(handler, db=tmp_path / "s.db", middlewares=[outer_catcher(caught)])
    assert store is not None
    client = await aiohttp_client(app)
    resp = await client.post(CHAT_PATH, json=chat_body())
    assert resp.status == exc_type.status_code
    assert await resp.text() == text
    assert len(caught) == 1
    assert isinstance(caught[0], exc_type)
    (ex,) = await exchanges(store)
    r = ex.response
    assert r is not None
    assert r.status_code == exc_type.status_code
    assert r.error == text
    assert r.openai_response == text
    assert r.session_id == md5("Hello world")


async def test_handler_exception_recorded_as_handler_error_then_reraised(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        raise ValueError("bad mapping of upstream reply")

    caught: list[BaseException] = []
    app, store = make_app(handler, db=tmp_path / "s.db", middlewares=[outer_catcher(caught)])
    assert store is not None
    client = await aiohttp_client(app)
    resp = await client.post(CHAT_PATH, json=chat_body())
    assert resp.status == 500
    assert len(caught) == 1
    assert isinstance(caught[0], ValueError)
    (ex,) = await exchanges(store)
    r = ex.response
    assert r is not None
    assert r.outcome == "handler_error"
    assert r.error is not None
    assert "bad mapping of upstream reply" in r.error
    assert r.duration_ms >= 0


# -- parent ids --------------------------------------------------------------------------------


async def test_response_parent_id_follows_the_session_turn_by_turn(
    aiohttp_client: ClientFactory, tmp_path: Path, backend_factory: Callable[..., Backend]
) -> None:
    client, store = await start(
        aiohttp_client, tmp_path, stateful_proxy, database=backend_factory()
    )
    history: list[dict[str, str]] = [{"role": "user", "content": "Plan a trip"}]
    for turn in (1, 2, 3):
        body = {"model": MODEL, "stream": turn == 2, "messages": history}
        resp = await client.post(CHAT_PATH, json=body)
        assert resp.status == 200
        await resp.read()
        history = [
            *history,
            {"role": "assistant", "content": f"reply {turn}"},
            {"role": "user", "content": f"question {turn + 1}"},
        ]
    recorded = await exchanges(store)
    assert [e.response.parent_id if e.response else "-" for e in recorded] == [
        "parent-1",
        "parent-2",
        "parent-3",
    ]
    sid = md5("Plan a trip")
    ((_, session),) = await store.manager.get_all_sessions()
    assert session.id == sid
    assert session.parent_id == "parent-3"
    assert session.message_count == 3
    assert session.chat_id == f"chat-{sid[:8]}"
    # What the handler sent upstream: only the new message, with the parent it held.
    upstream = [json.loads(e.request.upstream_request or "null") for e in recorded]
    assert [u["parent_id"] for u in upstream] == [None, "parent-1", "parent-2"]
    assert [u["message"] for u in upstream] == ["Plan a trip", "question 2", "question 3"]


async def test_response_parent_id_empty_when_the_handler_did_not_advance(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    client, store = await start(aiohttp_client, tmp_path, json_handler(completion("ok")))
    await client.post(CHAT_PATH, json=chat_body())
    (ex,) = await exchanges(store)
    assert ex.response is not None
    assert ex.response.parent_id is None


async def test_response_parent_id_is_the_one_this_call_set(
    aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    """Concurrent calls on one session: each row names only what its own handler did."""
    advancing_done = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        session = get_session(request)
        assert session is not None
        manager = get_store(request).manager
        tag = body["tag"]
        if tag == "advance":
            await manager.update_parent_id(session.id, "P-advance")
            advancing_done.set()
        elif tag == "idle":
            # Finishes after a concurrent call on the same session advanced it.
            await advancing_done.wait()
        elif tag == "same":
            # Advances to the parent the session already has: still this call's turn.
            await advancing_done.wait()
            await manager.update_parent_id(session.id, "P-advance")
        return web.json_response(completion(tag))

    client, store = await start(aiohttp_client, tmp_path, handler)

    async def call(tag: str) -> None:
        body = {**chat_body("One conversation"), "tag": tag}
        await (await client.post(CHAT_PATH, json=body)).read()

    await call("advance")  # the session exists before the concurrent calls
    advancing_done.clear()
    await asyncio.gather(call("idle"), call("same"), call("advance"))
    found = await exchanges(store)
    by_tag = {json.loads(e.request.openai_request or "{}")["tag"]: e for e in found[1:]}
    assert {tag: e.response.parent_id for tag, e in by_tag.items() if e.response} == {
        "idle": None,
        "same": "P-advance",
        "advance": "P-advance",
    }


# -- faults before the handler ---------------------------------------------------------------


class SlowCommits(SQLiteBackend):
    """Commits that take a while (a busy disk), so a client can leave during one."""

    delay = 0.4

    async def write_batch(self, batch: WriteBatch) -> None:
        await asyncio.sleep(self.delay)
        await super().write_batch(batch)


@pytest.mark.parametrize(
    "payload",
    [json.dumps(chat_body("Hello world")).encode(), b"not json"],
    ids=["new-session", "no-session"],
)
async def test_client_leaving_during_a_sync_commit_still_leaves_both_rows(
    aiohttp_server: Any, tmp_path: Path, payload: bytes
) -> None:
    """Every call on a session path leaves one request row and one response row.

    In sync durability the middleware awaits commits before the handler runs; a client
    that leaves then gets the task cancelled (aiohttp's handler_cancellation) right there.
    """
    ran = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        ran.set()
        return web.json_response(completion("ok"))

    app = web.Application()
    app.router.add_post(CHAT_PATH, handler)
    store = setup(app, SlowCommits(tmp_path / "s.db"), config=StoreConfig(durability="sync"))
    server = await aiohttp_server(app)  # the test server cancels handlers on disconnect
    _reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(raw_request(CHAT_PATH, payload))
    await writer.drain()
    await asyncio.sleep(0.1)  # the middleware is now waiting on the slow commit
    writer.close()
    await writer.wait_closed()
    recorded = await wait_for_responses(store, 1, timeout=3.0)
    assert len(recorded) == 1
    assert recorded[0].response is not None
    assert recorded[0].response.outcome == "client_disconnected"
    assert not ran.is_set()
    # The whole body had arrived before the client left: the record is the body as received.
    assert recorded[0].request.openai_request == payload.decode()
    await assert_one_response_per_request(store)


async def test_json_reply_to_a_client_that_left_is_not_completed(tmp_path: Path) -> None:
    """Without handler cancellation (run_app's default) the handler finishes after the
    client left; its reply is never written, and the record says so."""
    entered = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        entered.set()
        for _ in range(500):  # bounded: 5 s at most
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(0.01)
        return web.json_response(completion("nobody reads this"))

    app = web.Application()
    app.router.add_post(CHAT_PATH, handler)
    store = setup(app, tmp_path / "s.db")
    # The test server cancels handlers on disconnect: a runner as run_app makes one.
    runner = web.AppRunner(app, handler_cancellation=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw_request(CHAT_PATH, json.dumps(chat_body()).encode()))
        await writer.drain()
        await asyncio.wait_for(entered.wait(), 5)
        writer.close()
        await writer.wait_closed()
        (ex,) = await wait_for_responses(store, 1)
    finally:
        await runner.cleanup()
    assert ex.response is not None
    assert ex.response.outcome == "client_disconnected"
    assert ex.response.status_code is None
    assert ex.response.error is not None
