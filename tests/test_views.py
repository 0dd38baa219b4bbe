"""views.py: the JSON shapes, built from records alone (no database, no server)."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from aiohttp_session_store.models import Exchange, RequestRecord, ResponseRecord
from aiohttp_session_store.views import body_json, exchange_json, openai_chat_json, system_text

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
]
REPLY = {"choices": [{"message": {"role": "assistant", "content": "Hello", "extra": 1}}]}


def exchange(request: Any = None, reply: Any = REPLY, **response: Any) -> Exchange:
    body = {"model": "m", "messages": MESSAGES} if request is None else request
    req = RequestRecord(
        "q", "s", 1, "POST", "/v1/chat/completions", "m", False,
        body if isinstance(body, str) else json.dumps(body), None, "{}", 1,
    )  # fmt: skip
    resp = ResponseRecord(
        "r", "q", "s", 2, 200, "completed",
        reply if isinstance(reply, str) else json.dumps(reply),
        None, None, 1, 1, 2, "stop", None, 1, 1, 2,
    )  # fmt: skip
    return Exchange(req, replace(resp, **response))


def test_openai_chat_line_is_the_messages_and_the_reply() -> None:
    assert openai_chat_json(exchange()) == {
        "messages": [*MESSAGES, {"role": "assistant", "content": "Hello"}]
    }


@pytest.mark.parametrize(
    "case",
    [
        exchange(outcome="client_disconnected"),
        exchange(outcome="upstream_error", status_code=502),
        exchange(status_code=None),
        exchange(status_code=500),
        exchange(request=json.dumps({"truncated": True, "original_bytes": 9, "prefix": "{"})),
        exchange(request="not json"),
        exchange(request={"messages": []}),
        exchange(reply={"error": {"message": "x"}}),
        exchange(reply={"choices": []}),
        exchange(reply={"choices": [{"message": {"role": "assistant"}}]}),
        exchange(reply="cut {"),
        Exchange(exchange().request, None),
    ],
)
def test_calls_that_are_not_a_whole_turn_give_no_line(case: Exchange) -> None:
    assert openai_chat_json(case) is None


def test_system_text_joins_system_and_developer_messages() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "One."},
            {"role": "user", "content": "u"},
            {"role": "developer", "content": [{"type": "text", "text": "Two."}]},
            {"role": "system", "content": ""},
        ]
    }
    assert system_text(json.dumps(body)) == "One.\n\nTwo."
    assert system_text(json.dumps({"messages": [{"role": "user", "content": "u"}]})) is None
    assert system_text("not json") is None
    assert system_text(None) is None


def test_bodies_are_json_values_and_text_that_is_not_json_stays_text() -> None:
    assert body_json('{"a": [1]}') == {"a": [1]}
    assert body_json("not json {") == "not json {"
    assert body_json(None) is None
    full = exchange_json(exchange(), bodies=True)
    assert full["openai_request"]["messages"] == MESSAGES
    assert full["response"]["openai_response"] == REPLY
    assert full["system_prompt"] == "Be brief."
    assert "openai_request" not in exchange_json(exchange())
