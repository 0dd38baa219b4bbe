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
    "Node",
    "Settings",
    "conversation",
    "create_app",
    "main",
)

FAIL_MARKER: Final = "[fail]"
#: A user message containing this gets a tool call back instead of text.
TOOL_MARKER: Final = "[tool]"
ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})
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
class Node:
    """One message of a chat's tree, reachable by its id (the ``parent_id`` clients send)."""

    id: str
    parent: str | None  # the node this message was attached under (None: a root)
    #: The message as stored: ``role``, ``content`` and, when given, ``name``,
    #: ``tool_calls`` and ``tool_call_id``.
    message: dict[str, Any]


@dataclass(slots=True)
class Chat:
    """A conversation kept server side: its messages form a tree, as in the real service."""

    id: str
    title: str
    model: str
    nodes: dict[str, Node] = field(default_factory=dict)

    def chain(self, node_id: str | None) -> list[Node]:
        """The nodes from the root to ``node_id``, oldest first."""
        chain: list[Node] = []
        while node_id is not None:
            node = self.nodes[node_id]
            chain.append(node)
            node_id = node.parent
        chain.reverse()
        return chain

    def messages(self, node_id: str | None) -> list[dict[str, Any]]:
        """The conversation the model sees at ``node_id``: every message from the root."""
        return [node.message for node in self.chain(node_id)]


@dataclass(slots=True)
class CompletionCall:
    """What one call to ``/api/v2/chat/completions`` asked for and how it ended (for tests)."""

    chat_id: str | None
    parent_id: str | None
    #: The text of the last user message sent (None if there was none).
    message: str | None
    stream: bool
    #: Every message sent, as received.
    messages: list[Any] = field(default_factory=list)
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


def _compose_reply(chat_id: str, context: Sequence[dict[str, Any]]) -> str:
    """A deterministic reply that shows which turn of which chat this is and what came before."""
    said = [_text_of(m.get("content")) for m in context if m.get("role") == "user"]
    last = context[-1]
    if last.get("role") == "tool":
        text = (
            f'Turn {len(said)} of chat {chat_id}: the tool said "{_text_of(last.get("content"))}".'
        )
    else:
        text = f'Turn {len(said)} of chat {chat_id}: you said "{said[-1] if said else ""}".'
    earlier = said[:-1] if last.get("role") != "tool" else said
    if earlier:
        text += " Earlier you said: " + ", ".join(f'"{t}"' for t in earlier) + "."
    elif last.get("role") != "tool":
        text += " This is the start of our conversation."
    system = [_text_of(m.get("content")) for m in context if m.get("role") == "system"]
    if system:
        text += f' My instructions: "{system[-1]}".'
    return text


def _tool_call(text: str) -> dict[str, Any]:
    arguments = json.dumps({"query": text.replace(TOOL_MARKER, "").strip()})
    return {
        "id": f"call_{uuid.uuid4().hex[:12]}",
        "type": "function",
        "function": {"name": "lookup", "arguments": arguments},
    }


def _stored_message(raw: object) -> dict[str, Any] | None:
    """A message as the tree keeps it, or None when it is not a message this API takes."""
    if not isinstance(raw, dict) or raw.get("role") not in ROLES:
        return None
    message: dict[str, Any] = {"role": raw["role"], "content": _text_of(raw.get("content"))}
    for key in ("name", "tool_call_id"):
        if isinstance(raw.get(key), str):
            message[key] = raw[key]
    if isinstance(raw.get("tool_calls"), list) and raw["tool_calls"]:
        message["tool_calls"] = raw["tool_calls"]
    if not message["content"] and "tool_calls" not in message:
        return None
    return message


def conversation(app: web.Application, node_id: str) -> list[dict[str, Any]]:
    """The messages from the root of its chat to ``node_id`` (for tests: what the model saw)."""
    for chat in app[CHATS].values():
        if node_id in chat.nodes:
            return chat.messages(node_id)
    raise KeyError(node_id)


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
    """``POST /api/v2/chat/completions?chat_id=...``: messages attached under ``parent_id``."""
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
    raw_messages = body.get("messages")
    call.messages = raw_messages if isinstance(raw_messages, list) else []
    users = [m for m in call.messages if isinstance(m, dict) and m.get("role") == "user"]
    if users:
        call.message = _text_of(users[-1].get("content"))

    chat = request.app[CHATS].get(call.chat_id or "")
    if chat is None:
        return reject(400, "Not_Found", f"Chat {call.chat_id!r} does not exist.")
    if body.get("chat_id") not in (None, chat.id):
        return reject(400, "Bad_Request", "chat_id in the body does not match the query.")
    if parent_id is not None and (not isinstance(parent_id, str) or parent_id not in chat.nodes):
        return reject(400, "Bad_Request", f"The parent message {parent_id!r} does not exist.")
    messages = [_stored_message(m) for m in call.messages]
    if not messages or any(m is None for m in messages):
        return reject(
            400, "Bad_Request", "messages must be a non-empty list of messages with content."
        )
    if call.message is not None and FAIL_MARKER in call.message:
        return reject(500, "Internal_Error", "The model failed to respond (requested by [fail]).")

    # Every message becomes a node, chained under the previous one; the reply goes last.
    under = call.parent_id
    for message in messages:
        assert message is not None  # checked above
        node = Node(id=str(uuid.uuid4()), parent=under, message=message)
        chat.nodes[node.id] = node
        under = node.id
    context = chat.messages(under)
    last = context[-1]
    if last.get("role") == "user" and TOOL_MARKER in _text_of(last.get("content")):
        reply: dict[str, Any] = {
            "role": "assistant",
            "content": "",
            "tool_calls": [_tool_call(_text_of(last.get("content")))],
        }
    else:
        text = _compose_reply(chat.id, context)
        # A model answers a repeated question differently: say which attempt this is.
        twins = [
            n
            for n in chat.nodes.values()
            if under is not None and n.parent == chat.nodes[under].parent and n.message == last
        ]
        if len(twins) > 1:
            text += f" (take {len(twins)})"
        reply = {"role": "assistant", "content": text}
    # Stored before the reply goes out, as the real service does: once the stream has
    # announced the new parent_id, it is valid even if the stream then breaks.
    reply_node = Node(id=str(uuid.uuid4()), parent=under, message=reply)
    chat.nodes[reply_node.id] = reply_node
    call.new_parent_id = reply_node.id
    message_id = str(uuid.uuid4())

    input_tokens = sum(_count_tokens(_text_of(m.get("content"))) for m in context)
    output_tokens = _count_tokens(reply["content"]) + len(reply.get("tool_calls", ()))
    if not call.stream:
        call.finished = True
        choice_message = dict(reply)
        if "tool_calls" in choice_message:
            choice_message["content"] = None
        return web.json_response(
            {
                "success": True,
                "request_id": str(uuid.uuid4()),
                "data": {
                    "parent_id": reply_node.id,
                    "message_id": message_id,
                    "choices": [
                        {
                            "message": choice_message,
                            "finish_reason": "tool_calls" if "tool_calls" in reply else "stop",
                        }
                    ],
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
        await _stream_reply(
            request, response, call, chat, (reply_node.id, message_id), reply, input_tokens
        )
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
    message_id: str, delta: dict[str, Any], status: str, input_tokens: int, output_tokens: int
) -> dict[str, Any]:
    """One streamed event: a delta with the usage so far (cumulative, as Qwen sends)."""
    return {
        "choices": [{"delta": {"role": "assistant", **delta, "phase": "answer", "status": status}}],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
        "response_id": message_id,
    }


async def _stream_reply(
    request: web.Request,
    response: web.StreamResponse,
    call: CompletionCall,
    chat: Chat,
    ids: tuple[str, str],
    reply: dict[str, Any],
    input_tokens: int,
) -> None:
    node_id, message_id = ids
    created = {"chat_id": chat.id, "parent_id": node_id, "response_id": message_id}
    await _send_event(response, {"response.created": created})
    user_text = call.message or ""
    delay = _delay_for(user_text, request.app[SETTINGS])
    deltas: list[dict[str, Any]] = []
    for index, tool_call in enumerate(reply.get("tool_calls", ())):
        # Arguments in two pieces, as real services split them.
        arguments = tool_call["function"]["arguments"]
        half = len(arguments) // 2
        head = {**tool_call, "function": {**tool_call["function"], "arguments": arguments[:half]}}
        deltas.append({"tool_calls": [{"index": index, **head}]})
        deltas.append(
            {"tool_calls": [{"index": index, "function": {"arguments": arguments[half:]}}]}
        )
    deltas.extend({"content": piece} for piece in _split_deltas(reply["content"]) if piece)
    output_tokens = 0
    for index, delta in enumerate(deltas):
        if FAIL_MID_MARKER in user_text and index == DELTAS_BEFORE_FAILURE:
            call.error = "stream dropped (requested by [fail-mid])"
            _drop_connection(request)
            return
        if delay:
            await asyncio.sleep(delay)
        output_tokens += _count_tokens(delta.get("content", "")) + len(delta.get("tool_calls", ()))
        await _send_event(
            response, _qwen_delta(message_id, delta, "typing", input_tokens, output_tokens)
        )
    await _send_event(
        response, _qwen_delta(message_id, {"content": ""}, "finished", input_tokens, output_tokens)
    )
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
