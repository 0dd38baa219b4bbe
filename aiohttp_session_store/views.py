"""The JSON views of sessions and exchanges, shared by the CLI's `--json` and the query API.

Pure: records in, JSON-ready dicts out (no I/O), so both front ends speak the one format
documented in docs/cli.md.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from .backends.searchtext import SearchHit
from .hashing import content_text
from .models import Exchange, RequestRecord, ResponseRecord, Session
from .timeparse import format_iso

__all__ = (
    "body_json",
    "exchange_json",
    "hit_json",
    "last_user_text",
    "openai_chat_json",
    "reply_text",
    "session_json",
    "system_text",
)


def _loads(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def last_user_text(openai_request: str | None) -> str | None:
    """The text of the last `role == "user"` message of a stored chat request body."""
    body = _loads(openai_request)
    if not isinstance(body, Mapping) or not isinstance(body.get("messages"), list):
        return None
    for message in reversed(body["messages"]):
        if isinstance(message, Mapping) and message.get("role") == "user":
            return content_text(message.get("content"))
    return None


def system_text(openai_request: str | None) -> str | None:
    """The system prompt of a stored chat request body: the text of its `system` (and
    `developer`) messages, joined by blank lines; None when it has none."""
    body = _loads(openai_request)
    if not isinstance(body, Mapping) or not isinstance(body.get("messages"), list):
        return None
    texts = [
        content_text(m.get("content"))
        for m in body["messages"]
        if isinstance(m, Mapping) and m.get("role") in ("system", "developer")
    ]
    found = [t for t in texts if t]
    return "\n\n".join(found) if found else None


def reply_text(openai_response: str | None) -> str | None:
    """What the assistant said in a stored reply: choice 0's content, its tool calls, or the
    error message of an error body. None for bodies that are none of those."""
    body = _loads(openai_response)
    if not isinstance(body, Mapping):
        return None
    error = body.get("error")
    if isinstance(error, Mapping) and isinstance(error.get("message"), str):
        return f"[error] {error['message']}"
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return None
    message = choices[0].get("message")
    if not isinstance(message, Mapping):
        return None
    content = content_text(message.get("content"))
    calls = message.get("tool_calls")
    if isinstance(calls, list) and calls:
        names = []
        for call in calls:
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                names.append(f"{function.get('name')}({function.get('arguments') or ''})")
        rendered = "[tool calls] " + ", ".join(names)
        return f"{content}\n{rendered}" if content else rendered
    return content


def session_json(session: Session, *, now: int) -> dict[str, Any]:
    """A session as `sessions --json` and `GET /sessions` give it."""
    return {
        "id": session.id,
        "chat_id": session.chat_id,
        "parent_id": session.parent_id,
        "first_user_message": session.first_user_message,
        "message_count": session.message_count,
        "created_at": format_iso(session.created_at),
        "last_accessed": format_iso(session.last_accessed),
        "expires_at": format_iso(session.expires_at),
        "expired": session.is_expired(now),
    }


def body_json(text: str | None) -> Any:
    """A stored body as a JSON value: parsed when the stored text is JSON (a body cut at
    `max_body_bytes` is stored as a JSON envelope, so it parses too), else the text itself."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _response_json(response: ResponseRecord, *, bodies: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "response_id": response.response_id,
        "timestamp": format_iso(response.timestamp),
        "status_code": response.status_code,
        "outcome": response.outcome,
        "finish_reason": response.finish_reason,
        "parent_id": response.parent_id,
        "prompt_tokens": response.prompt_tokens,
        "completion_tokens": response.completion_tokens,
        "total_tokens": response.total_tokens,
        "duration_ms": response.duration_ms,
        "first_byte_ms": response.first_byte_ms,
        "error": response.error,
        "reply": reply_text(response.openai_response),
    }
    if bodies:
        out["openai_response"] = body_json(response.openai_response)
        out["upstream_response"] = body_json(response.upstream_response)
    return out


def exchange_json(exchange: Exchange, *, bodies: bool = False) -> dict[str, Any]:
    """A request with its response (null while in flight). `bodies` adds the headers and the
    stored bodies, as JSON values (see `body_json`)."""
    request: RequestRecord = exchange.request
    out: dict[str, Any] = {
        "request_id": request.request_id,
        "session_id": request.session_id,
        "timestamp": format_iso(request.timestamp),
        "method": request.method,
        "path": request.path,
        "model": request.model,
        "stream": request.stream,
        "user_message": last_user_text(request.openai_request),
        "system_prompt": system_text(request.openai_request),
    }
    if bodies:
        out["headers"] = body_json(request.headers)
        out["openai_request"] = body_json(request.openai_request)
        out["upstream_request"] = body_json(request.upstream_request)
    out["response"] = (
        None if exchange.response is None else _response_json(exchange.response, bodies=bodies)
    )
    return out


#: What an assistant message keeps in `openai_chat_json` (fine-tuning formats take no more).
_ASSISTANT_KEYS: Final = ("content", "tool_calls", "refusal")


def openai_chat_json(exchange: Exchange) -> dict[str, Any] | None:
    """One completed turn as ``{"messages": [...the request's..., assistant reply]}`` (plus
    the request's `tools`, if any), the line format of OpenAI's evaluation and fine-tuning
    files. None for a call that is not a whole, successful chat turn: not completed, no
    2xx, a body cut at `max_body_bytes`, or no assistant message in the reply."""
    response = exchange.response
    if response is None or response.outcome != "completed":
        return None
    if response.status_code is None or not 200 <= response.status_code < 300:
        return None
    request = _loads(exchange.request.openai_request)
    reply = _loads(response.openai_response)
    if not isinstance(request, Mapping) or not isinstance(reply, Mapping):
        return None
    messages = request.get("messages")
    choices = reply.get("choices")
    if not isinstance(messages, list) or not messages or not isinstance(choices, list):
        return None
    first = choices[0] if choices else None
    message = first.get("message") if isinstance(first, Mapping) else None
    if not isinstance(message, Mapping):
        return None
    assistant: dict[str, Any] = {"role": "assistant"}
    for key in _ASSISTANT_KEYS:
        if message.get(key) is not None:
            assistant[key] = message[key]
    if "content" not in assistant and "tool_calls" not in assistant:
        return None
    out: dict[str, Any] = {"messages": [*messages, assistant]}
    if isinstance(request.get("tools"), list):
        out["tools"] = request["tools"]
    return out


def hit_json(hit: SearchHit) -> dict[str, Any]:
    """A search match as `search --json` and `GET /requests?q=` give it: the exchange, plus
    `snippet`, an extract with the matched words between « and »."""
    return {**exchange_json(hit.exchange), "snippet": hit.snippet}
