"""A fake stateful LLM upstream that behaves like Qwen's web chat API, for offline use and tests.

Qwen's web chat does not take the conversation history on each turn. A client first creates a
chat, then sends only the new message together with the ``parent_id`` returned by the previous
reply; the server keeps the conversation. This app reproduces that protocol:

``POST /api/v2/chats/new``
    ``{"success": true, "data": {"id": "<chat_id>"}}``.

``POST /api/v2/chat/completions?chat_id=<chat_id>``
    Body ``{"stream": bool, "chat_id", "parent_id": null | "<id>", "messages": [<new message>]}``.
    Streaming: server-sent events; the first is
    ``{"response.created": {"chat_id", "parent_id", "response_id"}}`` whose ``parent_id`` is the
    one to send with the *next* turn, then content deltas carrying cumulative ``usage``, then a
    delta with ``"status": "finished"``. Non-streaming:
    ``{"success": true, "data": {"parent_id", "message_id", "choices": [...], "usage"}}``.
    An unknown chat, an unknown ``parent_id`` or a missing ``parent_id`` after the first turn is
    a 400, as with the real service, so a proxy that breaks the chain finds out at once.

``POST /v1/chat/completions``
    A plain OpenAI-compatible endpoint (stream or not, ``stream_options.include_usage``).

Replies are deterministic and describe the context the server holds, e.g.
``Turn 2 of chat 3f..: you said "What is 2+2?". Earlier you said: "Hello".``

Failures on demand, for tests: a message containing ``[fail]`` gets a 500 error; ``[fail-mid]``
breaks the stream (the connection is dropped) after a few deltas; ``[slow]`` spaces the deltas
out so a client can disconnect mid-reply.

Run it alone with ``python examples/fake_upstream.py --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from aiohttp import web

_T = TypeVar("_T")

__all__ = (
    "CALLS",
    "CHATS",
    "LOG_LIMIT",
    "OPENAI_CALLS",
    "SETTINGS",
    "Chat",
    "CompletionCall",
    "Settings",
    "Turn",
    "create_app",
    "main",
)

FAIL_MARKER: Final = "[fail]"
FAIL_MID_MARKER: Final = "[fail-mid]"
SLOW_MARKER: Final = "[slow]"

#: Replies are cut into at most this many content deltas.
MAX_DELTAS: Final = 8
#: Deltas sent before a ``[fail-mid]`` stream is dropped.
DELTAS_BEFORE_FAILURE: Final = 3


@dataclass(frozen=True, slots=True)
class Settings:
    """How this upstream behaves (fixed when the app is created)."""

    api_key: str | None = None
    model: str = "qwen-fake"
    #: Seconds between two content deltas (0 sends them back to back).
    delta_delay: float = 0.0
    #: Seconds between two deltas of a ``[slow]`` reply.
    slow_delay: float = 0.1


@dataclass(frozen=True, slots=True)
class Turn:
    """One exchange in a chat, reachable by the ``parent_id`` handed out for it."""

    parent_id: str  # what the client sends to continue after this turn
    message_id: str  # the assistant message (``response_id`` in the stream)
    previous: str | None  # the parent_id this turn was attached to
    user_message: str
    reply: str


@dataclass(slots=True)
class Chat:
    """A conversation kept server side: its turns form a tree, as in the real service."""

    id: str
    title: str
    model: str
    turns: dict[str, Turn] = field(default_factory=dict)

    def history(self, parent_id: str | None) -> list[Turn]:
        """The turns from the first one to ``parent_id``, oldest first."""
        chain: list[Turn] = []
        while parent_id is not None:
            turn = self.turns[parent_id]
            chain.append(turn)
            parent_id = turn.previous
        chain.reverse()
        return chain


@dataclass(slots=True)
class CompletionCall:
    """What one call to ``/api/v2/chat/completions`` asked for and how it ended (for tests)."""

    chat_id: str | None
    parent_id: str | None
    message: str | None
    stream: bool
    #: The parent_id handed out for the next turn; None when the call was rejected.
    new_parent_id: str | None = None
    #: HTTP status of the reply.
    status: int = 200
    error: str | None = None
    #: True once the whole reply was sent (stays False for a dropped or abandoned stream).
    finished: bool = False


SETTINGS: Final = web.AppKey("fake_upstream_settings", Settings)
#: How many calls the inspection logs below keep (tests read the latest ones); a
#: long-running example server must not grow without end.
LOG_LIMIT: Final = 1_000

CHATS: Final = web.AppKey("fake_upstream_chats", dict[str, Chat])
#: Every completion call received, in order: tests assert the parent chain from it.
CALLS: Final = web.AppKey("fake_upstream_calls", list[CompletionCall])
#: Every call to the OpenAI-compatible endpoint, as the parsed body.
OPENAI_CALLS: Final = web.AppKey("fake_upstream_openai_calls", list[dict[str, Any]])


# --------------------------------------------------------------------------- helpers


def _qwen_error(status: int, code: str, details: str) -> web.Response:
    """An error in the shape the web chat API uses."""
    body = {
        "success": False,
        "request_id": str(uuid.uuid4()),
        "data": {"code": code, "details": details},
    }
    return web.json_response(body, status=status)


def _openai_error(status: int, message: str, type_: str, code: str | None = None) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}, status=status
    )


def _text_of(content: object) -> str:
    """The text of a message's ``content``: a string, or the text parts of a list joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _count_tokens(text: str) -> int:
    # Whitespace-separated words: deterministic and good enough to make usage meaningful.
    return len(text.split())


def _split_deltas(text: str, max_deltas: int = MAX_DELTAS) -> list[str]:
    """Cut ``text`` into at most ``max_deltas`` word-aligned pieces that join back to ``text``."""
    words = re.findall(r"\S+\s*", text) or [text]
    size = -(-len(words) // max_deltas)  # ceiling division
    return ["".join(words[i : i + size]) for i in range(0, len(words), size)]


def _compose_reply(chat_id: str, message: str, history: Sequence[Turn]) -> str:
    """A deterministic reply that shows which turn of which chat this is and what came before."""
    text = f'Turn {len(history) + 1} of chat {chat_id}: you said "{message}".'
    if history:
        earlier = ", ".join(f'"{turn.user_message}"' for turn in history)
        return f"{text} Earlier you said: {earlier}."
    return f"{text} This is the start of our conversation."


def _delay_for(message: str, settings: Settings) -> float:
    return settings.slow_delay if SLOW_MARKER in message else settings.delta_delay


def _log(entries: list[_T], entry: _T) -> None:
    entries.append(entry)
    if len(entries) > LOG_LIMIT:
        del entries[: len(entries) - LOG_LIMIT]


async def _send_event(response: web.StreamResponse, payload: object) -> None:
    await response.write(f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())


async def _open_event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    return response


def _drop_connection(request: web.Request) -> None:
    """End a stream the way a crashing server does: no terminating chunk, just a closed socket."""
    if request.transport is not None:
        request.transport.abort()


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


@web.middleware
async def _require_api_key(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Check the bearer key when the app was created with one."""
    api_key = request.app[SETTINGS].api_key
    if api_key is not None and request.headers.get("Authorization") != f"Bearer {api_key}":
        if request.path.startswith("/v1/"):
            return _openai_error(
                401, "Invalid API key.", "invalid_request_error", "invalid_api_key"
            )
        return _qwen_error(401, "Unauthorized", "You need to sign in to continue.")
    return await handler(request)


# --------------------------------------------------------------------------- Qwen-style API


async def new_chat(request: web.Request) -> web.Response:
    """``POST /api/v2/chats/new``: start an empty conversation and return its id."""
    body = await _json_body(request) or {}
    settings = request.app[SETTINGS]
    models = body.get("models")
    model = models[0] if isinstance(models, list) and models else settings.model
    chat = Chat(id=str(uuid.uuid4()), title=str(body.get("title") or "New Chat"), model=str(model))
    request.app[CHATS][chat.id] = chat
    return web.json_response(
        {"success": True, "request_id": str(uuid.uuid4()), "data": {"id": chat.id}}
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /api/v2/chat/completions?chat_id=...``: one new message, attached to ``parent_id``."""
    body = await _json_body(request)
    chat_id = request.query.get("chat_id") or (body or {}).get("chat_id")
    call = CompletionCall(
        chat_id=chat_id if isinstance(chat_id, str) else None,
        parent_id=None,
        message=None,
        stream=bool((body or {}).get("stream", True)),
    )
    _log(request.app[CALLS], call)

    def reject(status: int, code: str, details: str) -> web.Response:
        call.status, call.error = status, details
        return _qwen_error(status, code, details)

    if body is None:
        return reject(400, "Bad_Request", "The request body must be a JSON object.")
    parent_id = body.get("parent_id")
    call.parent_id = parent_id if isinstance(parent_id, str) else None
    messages = body.get("messages")
    if isinstance(messages, list):
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            call.message = _text_of(users[-1].get("content"))

    chat = request.app[CHATS].get(call.chat_id or "")
    if chat is None:
        return reject(400, "Not_Found", f"Chat {call.chat_id!r} does not exist.")
    if body.get("chat_id") not in (None, chat.id):
        return reject(400, "Bad_Request", "chat_id in the body does not match the query.")
    if parent_id is not None and (not isinstance(parent_id, str) or parent_id not in chat.turns):
        return reject(400, "Bad_Request", f"The parent message {parent_id!r} does not exist.")
    if parent_id is None and chat.turns:
        # The real service would start a new branch; refusing makes a lost parent_id visible.
        return reject(400, "Bad_Request", "parent_id is required after the first turn.")
    if not call.message:
        return reject(400, "Bad_Request", "messages must hold a user message with text.")
    if FAIL_MARKER in call.message:
        return reject(500, "Internal_Error", "The model failed to respond (requested by [fail]).")

    history = chat.history(call.parent_id)
    reply = _compose_reply(chat.id, call.message, history)
    turn = Turn(
        parent_id=str(uuid.uuid4()),
        message_id=str(uuid.uuid4()),
        previous=call.parent_id,
        user_message=call.message,
        reply=reply,
    )
    # Stored before the reply goes out, as the real service does: once the stream has
    # announced the new parent_id, it is valid even if the stream then breaks.
    chat.turns[turn.parent_id] = turn
    call.new_parent_id = turn.parent_id

    input_tokens = sum(_count_tokens(t.user_message) + _count_tokens(t.reply) for t in history)
    input_tokens += _count_tokens(call.message)
    if not call.stream:
        output_tokens = _count_tokens(reply)
        call.finished = True
        return web.json_response(
            {
                "success": True,
                "request_id": str(uuid.uuid4()),
                "data": {
                    "parent_id": turn.parent_id,
                    "message_id": turn.message_id,
                    "choices": [{"message": {"role": "assistant", "content": reply}}],
                    "usage": {
                        "input_tokens": input_tokens,
                        "output_tokens": output_tokens,
                        "total_tokens": input_tokens + output_tokens,
                    },
                },
            }
        )

    response = await _open_event_stream(request)
    try:
        await _stream_turn(request, response, call, chat, turn, input_tokens)
    except ConnectionResetError:
        # The client hung up and a write failed. Returning (not raising) keeps aiohttp from
        # logging a traceback for what is an everyday event.
        call.error = "the client went away mid-reply"
    except asyncio.CancelledError:
        # The same, on a server started with handler_cancellation (as TestServer is).
        call.error = "the client went away mid-reply"
        raise
    return response


def _qwen_delta(
    turn: Turn, content: str, status: str, input_tokens: int, output_tokens: int
) -> dict[str, Any]:
    """One streamed event: a content delta with the usage so far (cumulative, as Qwen sends)."""
    delta = {"role": "assistant", "content": content, "phase": "answer", "status": status}
    return {
        "choices": [{"delta": delta}],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
        "response_id": turn.message_id,
    }


async def _stream_turn(
    request: web.Request,
    response: web.StreamResponse,
    call: CompletionCall,
    chat: Chat,
    turn: Turn,
    input_tokens: int,
) -> None:
    created = {"chat_id": chat.id, "parent_id": turn.parent_id, "response_id": turn.message_id}
    await _send_event(response, {"response.created": created})
    delay = _delay_for(turn.user_message, request.app[SETTINGS])
    output_tokens = 0
    for index, piece in enumerate(_split_deltas(turn.reply)):
        if FAIL_MID_MARKER in turn.user_message and index == DELTAS_BEFORE_FAILURE:
            call.error = "stream dropped (requested by [fail-mid])"
            _drop_connection(request)
            return
        if delay:
            await asyncio.sleep(delay)
        output_tokens += _count_tokens(piece)
        await _send_event(response, _qwen_delta(turn, piece, "typing", input_tokens, output_tokens))
    await _send_event(response, _qwen_delta(turn, "", "finished", input_tokens, output_tokens))
    await response.write_eof()
    call.finished = True


# --------------------------------------------------------------------------- OpenAI-compatible API


async def openai_chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: stateless, replies with what it received."""
    body = await _json_body(request)
    if body is None or not isinstance(body.get("messages"), list) or not body["messages"]:
        return _openai_error(400, "'messages' must be a non-empty list.", "invalid_request_error")
    _log(request.app[OPENAI_CALLS], body)
    messages: list[Any] = body["messages"]
    user_texts = [
        _text_of(m.get("content"))
        for m in messages
        if isinstance(m, dict) and m.get("role") == "user"
    ]
    last = user_texts[-1] if user_texts else ""
    if FAIL_MARKER in last:
        return _openai_error(
            500, "The model failed to respond (requested by [fail]).", "server_error"
        )

    settings = request.app[SETTINGS]
    model = str(body.get("model") or settings.model)
    reply = f'You sent {len(messages)} messages. Your last message was: "{last}".'
    prompt_tokens = sum(
        _count_tokens(_text_of(m.get("content"))) for m in messages if isinstance(m, dict)
    )
    completion_tokens = _count_tokens(reply)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    if not body.get("stream"):
        return web.json_response(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": reply},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
        )

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    stream_options = body.get("stream_options")
    include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
    delay = _delay_for(last, settings)
    response = await _open_event_stream(request)
    try:
        await _send_event(response, chunk({"role": "assistant", "content": ""}))
        for index, piece in enumerate(_split_deltas(reply)):
            if FAIL_MID_MARKER in last and index == DELTAS_BEFORE_FAILURE:
                _drop_connection(request)
                return response
            if delay:
                await asyncio.sleep(delay)
            await _send_event(response, chunk({"content": piece}))
        await _send_event(response, chunk({}, "stop"))
        if include_usage:
            await _send_event(response, {**chunk({}), "choices": [], "usage": usage})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client hung up: nothing to do, and no traceback to log
    return response


# --------------------------------------------------------------------------- app and CLI


def create_app(
    *,
    api_key: str | None = None,
    model: str = "qwen-fake",
    delta_delay: float = 0.0,
    slow_delay: float = 0.1,
) -> web.Application:
    """The fake upstream. With ``api_key``, every call must send ``Authorization: Bearer <key>``."""
    app = web.Application(middlewares=[_require_api_key])
    app[SETTINGS] = Settings(
        api_key=api_key, model=model, delta_delay=delta_delay, slow_delay=slow_delay
    )
    app[CHATS] = {}
    app[CALLS] = []
    app[OPENAI_CALLS] = []
    app.router.add_post("/api/v2/chats/new", new_chat)
    app.router.add_post("/api/v2/chat/completions", chat_completions)
    app.router.add_post("/v1/chat/completions", openai_chat_completions)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    parser.add_argument(
        "--delay", type=float, default=0.05, help="seconds between streamed deltas (default 0.05)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    web.run_app(
        create_app(api_key=args.api_key, delta_delay=args.delay), host=args.host, port=args.port
    )


if __name__ == "__main__":
    main()
