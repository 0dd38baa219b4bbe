"""The viewer's pages over HTTP (viewer.py, viewer_html.py, viewer_thread.py): signing in, the
cookie's limits, filters, bad input, and hostile content escaped. What a browser shows is
test_viewer_browser.py."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient
from test_query import FILLED, TOKEN, chat_app, converse

from aiohttp_session_store import get_session, get_store, setup
from aiohttp_session_store.query import create_query_app
from aiohttp_session_store.viewer import COOKIE_NAME

Client = TestClient[Any, Any]

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


async def _client(aiohttp_client: AiohttpClient, db: Path) -> tuple[Client, Any]:
    app, store = chat_app(str(db))
    app.add_subapp("/admin", create_query_app(store.manager, token=TOKEN, admin=True))
    client = await aiohttp_client(app)
    await converse(client)
    await store.flush()
    return client, store


@pytest.fixture
async def viewer(aiohttp_client: AiohttpClient, db_path: Path) -> Client:
    return (await _client(aiohttp_client, db_path))[0]


async def sign_in(client: Client) -> None:
    resp = await client.post("/admin/viewer/login", data={"token": TOKEN}, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/admin/viewer/"


async def test_pages_send_a_stranger_to_the_login_form(viewer: Client) -> None:
    for path in ("/admin/viewer/", f"/admin/viewer/sessions/{FILLED.hello}"):
        resp = await viewer.get(path, allow_redirects=False)
        assert resp.status == 303
        assert resp.headers["Location"] == "/admin/viewer/login"
    form = await viewer.get("/admin/viewer/login")
    text = await form.text()
    assert form.status == 200
    assert '<form method="post" action="/admin/viewer/login"' in text
    assert 'type="password"' in text
    assert "script-src 'self'" in form.headers["Content-Security-Policy"]
    assert form.headers["Cache-Control"] == "no-store"
    # The JSON API still answers 401 JSON, not a redirect.
    assert (await viewer.get("/admin/sessions")).status == 401


async def test_the_form_gives_an_httponly_strict_cookie_not_the_token(viewer: Client) -> None:
    wrong = await viewer.post("/admin/viewer/login", data={"token": TOKEN + "x"})
    assert wrong.status == 401
    assert "That token is not right." in await wrong.text()
    assert COOKIE_NAME not in wrong.cookies
    resp = await viewer.post("/admin/viewer/login", data={"token": TOKEN}, allow_redirects=False)
    assert resp.status == 303
    header = resp.headers["Set-Cookie"]
    assert "HttpOnly" in header
    assert "SameSite=Strict" in header
    assert "Path=/admin" in header
    assert TOKEN not in header
    page = await viewer.get("/admin/viewer/")
    assert page.status == 200
    assert FILLED.hello[:12] in await page.text()


async def test_the_cookie_reads_the_api_but_never_drives_an_admin_route(viewer: Client) -> None:
    await sign_in(viewer)
    listed = await viewer.get("/admin/sessions")
    assert listed.status == 200
    assert (await listed.json())["total"] == FILLED.sessions
    deleted = await viewer.delete(f"/admin/sessions/{FILLED.hello}")
    assert deleted.status == 401
    assert (await viewer.get(f"/admin/sessions/{FILLED.hello}")).status == 200
    # The bearer header keeps working, for the JSON API and the pages alike.
    viewer.session.cookie_jar.clear()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert (await viewer.get("/admin/viewer/", headers=auth)).status == 200


async def test_forged_expired_and_cross_site_sign_ins_are_refused(viewer: Client) -> None:
    for value in ("99999999999999.deadbeef", "1.abc", "not-a-cookie", TOKEN):
        viewer.session.cookie_jar.update_cookies({COOKIE_NAME: value})
        resp = await viewer.get("/admin/viewer/", allow_redirects=False)
        assert resp.status == 303, value
    viewer.session.cookie_jar.clear()
    cross = await viewer.post(
        "/admin/viewer/login",
        data={"token": TOKEN},
        headers={"Origin": "https://evil.example"},
        allow_redirects=False,
    )
    assert cross.status == 403
    assert "Set-Cookie" not in cross.headers
    out = await viewer.post("/admin/viewer/logout", allow_redirects=False)
    assert out.status == 303


async def test_filters_and_bad_input(viewer: Client) -> None:
    await sign_in(viewer)

    async def listed(**params: str) -> str:
        resp = await viewer.get("/admin/viewer/", params=params)
        assert resp.status == 200
        return await resp.text()

    everything = await listed()
    assert all(s[:12] in everything for s in (FILLED.hello, FILLED.story, FILLED.fail))
    qwen = await listed(model="qwen-max")
    assert FILLED.story[:12] in qwen
    assert FILLED.hello[:12] not in qwen
    failed = await listed(outcome="upstream_error")
    assert FILLED.fail[:12] in failed
    assert FILLED.story[:12] not in failed
    assert "1 of 1" in html.unescape(failed).replace("–", " ")
    assert FILLED.hello[:12] in await listed(since="1h", until="now")
    assert "No sessions match." in await listed(since="2000-01-01", until="2000-01-02")
    for params in ({"outcome": "nope"}, {"since": "yesterday"}, {"offset": "-1"}):
        resp = await viewer.get("/admin/viewer/", params=params)
        assert resp.status == 400, params
        assert "Bad filter" in await resp.text()
    missing = await viewer.get("/admin/viewer/sessions/no-such-session")
    assert missing.status == 404
    assert (await viewer.get(f"/admin/viewer/sessions/{FILLED.hello}?from=x")).status == 400


async def test_the_search_box_asks_the_json_api_with_q(viewer: Client) -> None:
    await sign_in(viewer)
    text = await (await viewer.get("/admin/viewer/")).text()
    form = re.search(r'<form method="get" action="([^"]+)" class="search" id="search"', text)
    assert form is not None
    assert form.group(1) == "/admin/requests"
    assert 'data-api="/admin/requests"' in text
    assert '<input type="search" name="q"' in text
    script = await viewer.get("/admin/viewer/static/viewer.js")
    assert script.status == 200
    assert "new URLSearchParams({ q: q" in await script.text()
    assert "innerHTML" not in await script.text()


# -- hostile content -------------------------------------------------------------------------------


async def _hostile_chat(request: web.Request) -> web.Response:
    body = await request.json()
    session = get_session(request)
    if session is not None:
        await get_store(request).manager.update_session(session.id, "node-1")
    message = {
        "role": "assistant",
        "content": HOSTILE,
        "reasoning_content": f"</details>{HOSTILE}",
        "tool_calls": [
            {
                "id": f'call"><script>1</script>{len(body["messages"])}',
                "type": "function",
                "function": {"name": HOSTILE, "arguments": json.dumps({"q": HOSTILE})},
            }
        ],
    }
    return web.json_response(
        {
            "id": "x",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
        }
    )


async def test_hostile_content_is_escaped_everywhere(
    aiohttp_client: AiohttpClient, db_path: Path
) -> None:
    app = web.Application()
    store = setup(app, str(db_path))
    app.router.add_post("/v1/chat/completions", _hostile_chat)
    app.add_subapp("/admin", create_query_app(store.manager, token=TOKEN))
    client = await aiohttp_client(app)
    messages = [
        {"role": "system", "content": HOSTILE},
        {"role": "user", "content": HOSTILE, "name": HOSTILE},
        {"role": "tool", "tool_call_id": HOSTILE, "content": [{"type": "text", "text": HOSTILE}]},
    ]
    headers = {"Authorization": "Bearer sk-x"}
    body = {"model": HOSTILE, "messages": messages}
    assert (await client.post("/v1/chat/completions", json=body, headers=headers)).status == 200
    await store.flush()
    await sign_in(client)
    listing = await (await client.get("/admin/viewer/")).text()
    session_path = re.search(r'href="(/admin/viewer/sessions/[^"]+)"', listing)
    assert session_path is not None
    page = await client.get(html.unescape(session_path.group(1)))
    assert page.status == 200
    text = await page.text()
    for shown in (listing, text):
        assert "<script>" not in shown.replace('<script src="/admin/viewer/static/viewer.js"', "")
        assert "<img" not in shown
        assert "onerror=alert" not in shown.replace("onerror=alert(1)&gt;", "")
    assert html.escape(HOSTILE) in text
    assert text.count("<details") == 1  # the hostile </details> did not close it
    assert '<details class="reasoning"><summary>Reasoning</summary>' in text
