"""An OpenAI-compatible aiohttp proxy, with sessions and recording added by `setup()`.

The proxy is built the way one usually is: one handler for ``POST /v1/chat/completions``, a
shared ``aiohttp.ClientSession`` to talk to the upstream, and streaming with a plain
``web.StreamResponse``. The one line that adds sessions and request/response records is
``aiohttp_session_store.setup(app, ...)``; the handler then reads the conversation's session
with ``get_session(request)``.

Two modes:

``stateful`` (the default without ``--upstream``)
    For an upstream that keeps the conversation itself, such as Qwen's web chat (see
    ``fake_upstream.py``). Clients resend the whole history each turn; ``get_turn(request)``
    says which upstream chat and node that history continues (its lineage) and which
    messages the upstream has not seen on that branch, and the proxy sends exactly those.
    A history nothing is known of (a new conversation, an edited first message, a changed
    system prompt) starts a new upstream chat with the whole history; so does one whose
    chat the upstream has forgotten.

``openai`` (the default with ``--upstream``)
    Forwards each request as is to an OpenAI-compatible API (``--upstream`` is its base URL,
    as the openai client takes it, e.g. ``https://api.openai.com/v1``) and streams the reply
    back unchanged. Sessions and records still happen, in the middleware.

Run it offline, against a fake upstream started in the same process::

    python examples/proxy_server.py
    curl -N localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "qwen-fake", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'

then look at what was recorded with ``python -m aiohttp_session_store --db data/sessions.db``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
import fake_upstream  # a sibling script: Python puts the script's directory on sys.path
from aiohttp import web
from multidict import CIMultiDict

from aiohttp_session_store import (
    StoreConfig,
    StoreUnavailableError,
    Turn,
    get_session,
    get_store,
    get_turn,
    mark_upstream_error,
    set_upstream,
    setup,
)
from aiohttp_session_store.hashing import content_text
from aiohttp_session_store.models import now_ms
from aiohttp_session_store.sse import SSEParser

__all__ = ("create_app", "main")

log: Final = logging.getLogger("proxy_server")

Mode = Literal["stateful", "openai"]
MODES: Final[tuple[Mode, ...]] = ("stateful", "openai")
DEFAULT_MODEL: Final = "qwen-fake"
UPSTREAM_KEY_ENV: Final = "UPSTREAM_API_KEY"

# Streams can legitimately run for minutes, so no total timeout: a connect timeout, and a
# read timeout that catches an upstream that stops sending without closing.
UPSTREAM_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)

# Hop-by-hop and body-framing headers are the proxy's own business on each leg, never forwarded.
# Accept-Encoding is dropped too: the client session decompresses, and the bytes are
# forwarded as they were decoded.
_NOT_FORWARDED: Final = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "content-encoding",
        "accept-encoding",
        "authorization",
    }
)


@dataclass(slots=True)
class Upstream:
    """Where and how to reach the upstream. ``url`` is filled in at startup for the fake."""

    mode: Mode
    url: str
    api_key: str | None = None

    def endpoint(self, path: str) -> str:
        return self.url.rstrip("/") + path


class UpstreamError(Exception):
    """The upstream answered with an error, or its reply could not be used."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


UPSTREAM: Final = web.AppKey("proxy_upstream", Upstream)
HTTP: Final = web.AppKey("proxy_http", aiohttp.ClientSession)
#: The in-process fake upstream's app, when the proxy started one (tests inspect it).
FAKE_UPSTREAM: Final = web.AppKey("proxy_fake_upstream", web.Application)


# --------------------------------------------------------------------------- small helpers


def openai_error(
    status: int, message: str, type_: str = "invalid_request_error", code: str | None = None
) -> web.Response:
    """An error body in the shape OpenAI clients parse."""
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}, status=status
    )


def _text_of(content: object) -> str:
    """A message's text, by the same rule the store derives session ids with."""
    return content_text(content) or ""


def last_user_text(body: Mapping[str, Any]) -> str | None:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return None


def upstream_headers(request: web.Request, upstream: Upstream) -> dict[str, str]:
    """Authorization for the upstream: the proxy's key, else whatever the client sent."""
    if upstream.api_key:
        return {"Authorization": f"Bearer {upstream.api_key}"}
    client_auth = request.headers.get("Authorization")
    return {"Authorization": client_auth} if client_auth else {}


def error_detail(status: int, text: str) -> tuple[str, str | None]:
    """The message and code of an upstream error body (Qwen's or OpenAI's shape, or raw)."""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error, data = body.get("error"), body.get("data")
        if isinstance(error, dict) and error.get("message"):
            code = error.get("code")
            return str(error["message"]), str(code) if code is not None else None
        if isinstance(data, dict) and (data.get("details") or data.get("code")):
            code = data.get("code")
            return str(data.get("details") or code), str(code) if code is not None else None
    return (text.strip()[:500] or f"HTTP {status}"), None


def client_status_for(upstream_status: int, *, client_credentials: bool) -> int:
    """The status the client gets for an upstream error.

    A 4xx is about the request, so the client gets it as is (a 400 for a broken parent
    chain, a 429 to back off), except 401/403 caused by the proxy's own key: the client's
    credentials are fine, so that is a gateway failure. Upstream 5xx are a 502.
    """
    if upstream_status in (401, 403) and not client_credentials:
        return 502
    if 400 <= upstream_status < 500:
        return upstream_status
    return 502


async def raise_for_upstream(request: web.Request, resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    text = await resp.text(errors="replace")
    set_upstream(request, response_body=text)
    message, code = error_detail(resp.status, text)
    raise UpstreamError(resp.status, f"upstream returned {resp.status}: {message}", code)


def error_reply(request: web.Request, exc: UpstreamError) -> web.Response:
    upstream = request.app[UPSTREAM]
    status = client_status_for(
        exc.status, client_credentials=not upstream.api_key and "Authorization" in request.headers
    )
    mark_upstream_error(request, exc.message)
    type_ = "invalid_request_error" if status < 500 else "upstream_error"
    return openai_error(status, exc.message, type_, exc.code)


async def upstream_failed(
    request: web.Request, response: web.StreamResponse | None, url: str, exc: Exception
) -> web.StreamResponse:
    """The reply when talking to the upstream failed: a 502, or an error event mid-stream."""
    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, (aiohttp.ClientConnectorError, asyncio.TimeoutError)):
        message, code = f"cannot reach the upstream at {url}: {reason}", "upstream_unreachable"
    elif isinstance(exc, aiohttp.ClientError):
        message, code = f"the reply from the upstream at {url} broke off: {reason}", None
    else:  # ValueError: not the JSON this upstream speaks
        message, code = f"unreadable reply from the upstream at {url}: {reason}", None
    if response is not None:
        await end_with_error(request, response, message)
        return response
    log.warning("%s", message)
    mark_upstream_error(request, message)
    return openai_error(502, message, "upstream_error", code)


async def iter_sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event (the package's parser: any chunking, WHATWG rules)."""
    parser = SSEParser()
    async for chunk in content.iter_any():
        for event in parser.feed(chunk):
            yield event.data
    for event in parser.close():
        yield event.data


async def open_event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    return response


async def send_event(response: web.StreamResponse, payload: object) -> None:
    await response.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())


def client_went_away(session_id: str | None, response: web.StreamResponse) -> web.StreamResponse:
    """The client hung up mid-reply (a write to it failed).

    Returning the response, rather than raising, keeps aiohttp from logging a traceback for
    an everyday event; the middleware saw the failed write and records the call as
    ``client_disconnected`` with what was sent. Leaving the ``async with`` around the
    upstream reply closes that connection, so the upstream stops generating.
    """
    log.info("session %s: the client went away mid-reply", session_id)
    return response


async def end_with_error(request: web.Request, response: web.StreamResponse, message: str) -> None:
    """End a started stream that broke: an error event (the openai client raises on it)."""
    log.warning("%s", message)
    mark_upstream_error(request, message)
    await send_event(
        response, {"error": {"message": message, "type": "upstream_error", "code": None}}
    )
    await response.write_eof()


# --------------------------------------------------------------------------- stateful mode


@dataclass(slots=True)
class Completion:
    """One OpenAI-side reply being built: identity, and what the upstream has said so far."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    content: list[str] = field(default_factory=list)
    #: Tool calls of the reply, assembled by index (streamed ones arrive in pieces).
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] | None = None

    def add_tool_call_delta(self, delta: dict[str, Any]) -> None:
        index = delta.get("index", len(self.tool_calls))
        while len(self.tool_calls) <= index:
            self.tool_calls.append(
                {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
        call = self.tool_calls[index]
        if isinstance(delta.get("id"), str):
            call["id"] = delta["id"]
        function = as_dict(delta.get("function"))
        if isinstance(function.get("name"), str):
            call["function"]["name"] += function["name"]
        if isinstance(function.get("arguments"), str):
            call["function"]["arguments"] += function["arguments"]

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "stop"

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    def openai_usage(self) -> dict[str, int]:
        usage = self.usage or {}
        return {
            "prompt_tokens": usage.get("input_tokens", 0),
            "completion_tokens": usage.get("output_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
        }

    def message(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": self.reply_message(),
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self.openai_usage(),
        }

    def reply_message(self) -> dict[str, Any]:
        text = "".join(self.content)
        if self.tool_calls:
            return {"role": "assistant", "content": text or None, "tool_calls": self.tool_calls}
        return {"role": "assistant", "content": text}


async def new_upstream_chat(request: web.Request, model: str, title: str) -> str:
    """Create an upstream chat; its id."""
    upstream = request.app[UPSTREAM]
    async with request.app[HTTP].post(
        upstream.endpoint("/api/v2/chats/new"),
        json={
            "title": title[:50] or "New Chat",
            "models": [model],
            "chat_mode": "normal",
            "chat_type": "t2t",
            "timestamp": int(time.time() * 1000),
        },
        headers=upstream_headers(request, upstream),
    ) as resp:
        await raise_for_upstream(request, resp)
        reply = await resp.json(content_type=None)
    chat_id = reply.get("data", {}).get("id") if isinstance(reply, dict) else None
    if not isinstance(chat_id, str):
        raise UpstreamError(502, f"upstream chat creation returned no chat id: {reply!r:.200}")
    return chat_id


def upstream_message(message: Mapping[str, Any], parent_id: str | None) -> dict[str, Any]:
    """One client message as the Qwen web chat takes it."""
    out: dict[str, Any] = {
        "role": message.get("role"),
        "content": _text_of(message.get("content")),
        "chat_type": "t2t",
        "parent_id": parent_id,
    }
    if message.get("role") == "user":
        out.update(user_action="chat", files=[])
    for key in ("name", "tool_calls", "tool_call_id"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out


def qwen_request(
    chat_id: str,
    parent_id: str | None,
    messages: Sequence[Mapping[str, Any]],
    model: str,
    stream: bool,
) -> dict[str, Any]:
    """A Qwen web chat request: the messages the chat has not seen, under ``parent_id``."""
    return {
        "stream": stream,
        "incremental_output": True,
        "chat_id": chat_id,
        "chat_mode": "normal",
        "model": model,
        "parent_id": parent_id,
        "messages": [upstream_message(m, parent_id) for m in messages],
        "timestamp": int(time.time()),
    }


@dataclass(slots=True)
class Exchange:
    """One call through the stateful upstream: where it continues, and the reply so far."""

    turn: Turn
    chat_id: str
    completion: Completion

    @property
    def session_id(self) -> str | None:
        return self.turn.session.id if self.turn.session is not None else None

    async def advance(self, request: web.Request, new_parent: str) -> None:
        """Report the upstream node the reply became (the store records the lineage)."""
        await self.turn.advance(chat_id=self.chat_id, node_id=new_parent)
        log.info(
            "chat %s: %d message(s) under %s -> reply %s",
            self.chat_id,
            len(self.turn.messages),
            self.turn.parent_id,
            new_parent,
        )


def as_dict(value: object) -> dict[str, Any]:
    # The upstream's JSON is read defensively: a missing or odd field is "absent".
    return value if isinstance(value, dict) else {}


def first_choice(container: dict[str, Any]) -> dict[str, Any]:
    choices = container.get("choices")
    return as_dict(choices[0]) if isinstance(choices, list) and choices else {}


async def reply_json(
    request: web.Request, resp: aiohttp.ClientResponse, turn: Exchange
) -> web.Response:
    """A non-streaming upstream reply as a ``chat.completion``."""
    reply = await resp.json(content_type=None)
    set_upstream(request, response_body=reply)
    data = as_dict(as_dict(reply).get("data"))
    new_parent = data.get("parent_id")
    if not isinstance(new_parent, str):
        raise UpstreamError(502, f"upstream reply has no data.parent_id: {reply!r:.200}")
    await turn.advance(request, new_parent)
    message = as_dict(first_choice(data).get("message"))
    turn.completion.content.append(_text_of(message.get("content")))
    for index, call in enumerate(message.get("tool_calls") or ()):
        turn.completion.add_tool_call_delta({"index": index, **as_dict(call)})
    turn.completion.usage = as_dict(data.get("usage"))
    return web.json_response(turn.completion.message())


async def relay_stream(
    request: web.Request,
    resp: aiohttp.ClientResponse,
    turn: Exchange,
    url: str,
    include_usage: bool,
) -> web.StreamResponse:
    """Translate the upstream's event stream into OpenAI ``chat.completion.chunk`` events.

    The client's stream is opened at the first content event, so that an upstream failing
    before it (no ``response.created``, an error event) is still a plain JSON error.
    """
    completion = turn.completion
    response: web.StreamResponse | None = None
    raw_events: list[str] = []
    new_parent: str | None = None

    async def send(chunk: dict[str, Any]) -> None:
        nonlocal response
        if response is None:
            response = await open_event_stream(request)
            await send_event(response, usage_null(completion.chunk({"role": "assistant"})))
        await send_event(response, chunk)

    def usage_null(chunk: dict[str, Any]) -> dict[str, Any]:
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        return {**chunk, "usage": None} if include_usage else chunk

    try:
        finished = False
        async for data in iter_sse_data(resp.content):
            raw_events.append(data)
            event = as_dict(json.loads(data)) if data != "[DONE]" else {}
            if "response.created" in event:
                created = as_dict(event["response.created"]).get("parent_id")
                if isinstance(created, str):
                    # Stored at once: the upstream keeps the turn even if the stream breaks.
                    new_parent = created
                    await turn.advance(request, new_parent)
                continue
            if "error" in event:
                message, code = error_detail(502, data)
                raise UpstreamError(502, f"upstream stream error: {message}", code)
            if "usage" in event:
                completion.usage = as_dict(event["usage"])  # cumulative: the last one counts
            delta = as_dict(first_choice(event).get("delta"))
            content = delta.get("content")
            if isinstance(content, str) and content:
                completion.content.append(content)
                await send(usage_null(completion.chunk({"content": content})))
            tool_calls = delta.get("tool_calls")
            if isinstance(tool_calls, list) and tool_calls:
                for call in tool_calls:
                    completion.add_tool_call_delta(as_dict(call))
                await send(usage_null(completion.chunk({"tool_calls": tool_calls})))
            if delta.get("status") == "finished" or data == "[DONE]":
                finished = True
                break
        set_upstream(request, response_body="".join(f"data: {e}\n\n" for e in raw_events))
        if new_parent is None:
            raise UpstreamError(502, "upstream stream carried no response.created parent_id")
        if not finished:
            raise UpstreamError(502, "upstream stream ended before the reply finished")
        await send(usage_null(completion.chunk({}, completion.finish_reason)))
        if include_usage:
            await send({**completion.chunk({}), "choices": [], "usage": completion.openai_usage()})
        assert response is not None  # send() opened it
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    except ConnectionResetError:
        if response is None:
            raise
        return client_went_away(turn.session_id, response)
    except UpstreamError as exc:
        if response is None:
            return error_reply(request, exc)
        await end_with_error(request, response, exc.message)
        return response
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        set_upstream(request, response_body="".join(f"data: {e}\n\n" for e in raw_events))
        return await upstream_failed(request, response, url, exc)


def upstream_lost_it(exc: UpstreamError) -> bool:
    """The upstream no longer knows the chat or node we continued (expired, reset)."""
    if exc.status in (404, 410):
        return True
    message = exc.message.lower()
    return exc.status == 400 and any(
        phrase in message for phrase in ("does not exist", "not found", "no such", "unknown")
    )


async def stateful_completion(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """Continue the upstream chat this history continues, or start one with all of it."""
    turn = get_turn(request)
    if turn is None or get_session(request) is None:
        return openai_error(400, "'messages' must include a user message with text.")
    model = str(body.get("model") or DEFAULT_MODEL)
    stream = body.get("stream") is True
    upstream = request.app[UPSTREAM]
    url = upstream.endpoint("/api/v2/chats/new")
    try:
        for attempt in range(2):
            chat_id = turn.chat_id
            if chat_id is None:
                url = upstream.endpoint("/api/v2/chats/new")
                title = (turn.session.first_user_message if turn.session else None) or "New Chat"
                chat_id = await new_upstream_chat(request, model, title)
                log.info("new upstream chat %s for %d message(s)", chat_id, len(turn.messages))
            upstream_body = qwen_request(chat_id, turn.parent_id, turn.messages, model, stream)
            set_upstream(request, request_body=upstream_body)
            url = upstream.endpoint("/api/v2/chat/completions")
            async with request.app[HTTP].post(
                url,
                params={"chat_id": chat_id},
                json=upstream_body,
                headers=upstream_headers(request, upstream),
            ) as resp:
                try:
                    await raise_for_upstream(request, resp)
                except UpstreamError as exc:
                    if attempt == 0 and turn.chat_id is not None and upstream_lost_it(exc):
                        # Start over with the whole history: the client's view of the
                        # conversation is the truth, the upstream's memory of it is gone.
                        log.info("upstream lost chat %s (%s); starting anew", chat_id, exc)
                        turn.restart()
                        continue
                    raise
                exchange = Exchange(turn, chat_id, Completion(model=model))
                if not stream:
                    return await reply_json(request, resp, exchange)
                options = body.get("stream_options")
                include_usage = isinstance(options, dict) and options.get("include_usage") is True
                return await relay_stream(request, resp, exchange, url, include_usage)
        raise AssertionError("unreachable: the second attempt returns or raises")
    except ConnectionResetError:
        raise  # the client went away (aiohttp's reset error is also a ClientError)
    except UpstreamError as exc:
        return error_reply(request, exc)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return await upstream_failed(request, None, url, exc)


# --------------------------------------------------------------------------- openai mode


async def forward_completion(request: web.Request, raw: bytes) -> web.StreamResponse:
    """Send the request to an OpenAI-compatible upstream as is; relay the reply unchanged."""
    upstream = request.app[UPSTREAM]
    url = upstream.endpoint("/chat/completions")
    headers = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED
    )
    headers.update(upstream_headers(request, upstream))
    set_upstream(request, request_body=raw)
    response: web.StreamResponse | None = None
    received = bytearray()
    try:
        async with request.app[HTTP].post(url, data=raw, headers=headers) as resp:
            await raise_for_upstream(request, resp)
            if resp.content_type != "text/event-stream":
                data = await resp.read()
                set_upstream(request, response_body=data)
                await count_turn(request, completion_id(data))
                return web.Response(body=data, status=resp.status, content_type=resp.content_type)
            response = web.StreamResponse(
                status=resp.status,
                headers={"Content-Type": resp.headers["Content-Type"], "Cache-Control": "no-cache"},
            )
            await response.prepare(request)
            async for chunk in resp.content.iter_any():
                received += chunk
                await response.write(chunk)
            set_upstream(request, response_body=bytes(received))
            await count_turn(request, completion_id(received))
            await response.write_eof()
            return response
    except ConnectionResetError:
        if response is None:
            raise
        session = get_session(request)
        return client_went_away(session.id if session else None, response)
    except UpstreamError as exc:
        return error_reply(request, exc)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        if received:
            set_upstream(request, response_body=bytes(received))
        return await upstream_failed(request, response, url, exc)


def completion_id(body: bytes | bytearray) -> str | None:
    """The ``id`` of a chat.completion body, or of the first chunk of a stream."""
    if not body.startswith(b"data:"):
        try:
            reply = json.loads(body)
        except ValueError:
            return None
        reply_id = reply.get("id") if isinstance(reply, dict) else None
        return reply_id if isinstance(reply_id, str) else None
    for line in bytes(body).splitlines():
        if line.startswith(b"data:") and line[5:].strip() != b"[DONE]":
            try:
                chunk = json.loads(line[5:])
            except ValueError:
                continue
            chunk_id = chunk.get("id") if isinstance(chunk, dict) else None
            if isinstance(chunk_id, str):
                return chunk_id
    return None


async def count_turn(request: web.Request, reply_id: str | None) -> None:
    """Count a completed turn in the session, remembering the reply's id as its parent.

    An OpenAI-compatible upstream keeps no conversation, so there is no chain to follow,
    but the session still shows how many turns it had and which reply came last.
    """
    session = get_session(request)
    if session is not None:
        try:
            await get_store(request).manager.update_parent_id(session.id, reply_id)
        except StoreUnavailableError as exc:
            # The reply itself is fine (and may be on its way): only the count is lost.
            log.warning("session %s: turn not counted: %s", session.id, exc)


# --------------------------------------------------------------------------- routes and app


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return openai_error(400, "the body must be a JSON object with a 'messages' list.")
    try:
        if request.app[UPSTREAM].mode == "openai":
            return await forward_completion(request, raw)
        return await stateful_completion(request, body)
    except StoreUnavailableError as exc:
        # Without the store the next turn cannot find this one: the client retries.
        log.warning("session store unavailable: %s", exc)
        reply = openai_error(503, "the session store is unavailable; retry shortly", "server_error")
        reply.headers["Retry-After"] = "1"
        return reply


async def health(request: web.Request) -> web.Response:
    """``GET /health``: readiness, with the mode and the number of live sessions.

    503 while the session store cannot be reached (a load balancer then sends traffic
    elsewhere); 200 again once it is back.
    """
    upstream = request.app[UPSTREAM]
    store = get_store(request)
    body: dict[str, Any] = {"status": "ok", "mode": upstream.mode, "upstream": upstream.url}
    try:
        if not store.ready:
            raise StoreUnavailableError("not connected yet")
        # Committed sessions only: a probe must not force (or wait on) a commit.
        body["active_sessions"] = await store.backend.count_sessions(active_at=now_ms())
    except StoreUnavailableError as exc:
        body.update(status="unavailable", error=f"session store: {exc}")
        return web.json_response(body, status=503, headers={"Retry-After": "1"})
    return web.json_response(body)


async def http_client(app: web.Application) -> AsyncIterator[None]:
    """One client session for every upstream call: connection pooling, closed on shutdown."""
    async with aiohttp.ClientSession(timeout=UPSTREAM_TIMEOUT) as session:
        app[HTTP] = session
        yield


def fake_upstream_ctx(
    fake: web.Application,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """Serve ``fake`` on an ephemeral 127.0.0.1 port for the app's lifetime (offline mode)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(fake, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            base = f"http://{host}:{port}"
            upstream = app[UPSTREAM]
            upstream.url = base + "/v1" if upstream.mode == "openai" else base
            log.info("fake %s upstream listening on %s", upstream.mode, upstream.url)
            yield
        finally:
            await runner.cleanup()

    return ctx


def create_app(
    *,
    db: str | os.PathLike[str] = "data/sessions.db",
    upstream: str | None = None,
    upstream_key: str | None = None,
    mode: Mode | None = None,
    config: StoreConfig | None = None,
) -> web.Application:
    """The proxy. Without ``upstream``, it serves a fake upstream itself (stateful by default)."""
    resolved: Mode = mode or ("stateful" if upstream is None else "openai")
    if resolved not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    app = web.Application()
    app[UPSTREAM] = Upstream(mode=resolved, url=upstream or "", api_key=upstream_key)
    if upstream is None:
        fake = fake_upstream.create_app(api_key=upstream_key, delta_delay=0.05)
        app[FAKE_UPSTREAM] = fake
        app.cleanup_ctx.append(fake_upstream_ctx(fake))
    app.cleanup_ctx.append(http_client)
    setup(app, database=db, config=config)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/health", health)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="OpenAI-compatible proxy with conversation sessions and recording."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--db", default="data/sessions.db", help="SQLite path or database URL")
    parser.add_argument(
        "--upstream",
        default=None,
        help="upstream base URL (default: a fake stateful upstream in this process); in openai"
        " mode the API base as the openai client takes it (e.g. https://api.openai.com/v1:"
        " the proxy posts to URL/chat/completions), in stateful mode the host root (the proxy"
        " posts to URL/api/v2/...)",
    )
    parser.add_argument(
        "--upstream-key",
        default=os.environ.get(UPSTREAM_KEY_ENV),
        help=f"bearer key for the upstream (default: ${UPSTREAM_KEY_ENV})",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="stateful: send only the new message with the session's parent_id; "
        "openai: forward as is (default: stateful without --upstream, openai with it)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if "://" not in args.db:
        Path(args.db).parent.mkdir(parents=True, exist_ok=True)
    app = create_app(
        db=args.db, upstream=args.upstream, upstream_key=args.upstream_key, mode=args.mode
    )
    # run_app handles Ctrl-C and SIGTERM: it stops accepting, lets running calls finish
    # (up to shutdown_timeout), then runs the cleanup contexts (store flushed, client closed).
    web.run_app(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
