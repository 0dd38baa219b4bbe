"""Teeing what a handler streams to its client, and turning it into a response record body.

The tee wraps the prepared response's `write`/`write_eof`: the narrowest point every
StreamResponse (and aiohttp-sse's EventSourceResponse) sends its body through. Each write
is passed on untouched and first; only bytes that reached the transport are kept, so a
record of a broken stream holds exactly what the client was sent.

An event stream's writes are kept as they are and taken in batches (at the end, or each
time 64 KiB have come): split into events in a few calls when they have a chat stream's
usual shape (`split_data_events`), handed to the assembler's bulk path (`feed_payloads`);
anything else goes through `SSEParser` until it is back between events. Per write, only
an append.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from .assembler import ChatStreamAssembler
from .completion import CompletionSummary, completion_summary, json_loads
from .sse import SSEParser, split_data_events

__all__ = (
    "CapturedBody",
    "ResponseCapture",
    "body_text",
    "is_event_stream",
    "one_replacement",
    "response_body",
    "stored_text",
    "summarize_body",
)

log: Final = logging.getLogger("aiohttp_session_store.capture")
_EMPTY_SUMMARY: Final = CompletionSummary(None, None, None, None)
_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")
# Made once: json.dumps with an option builds a new encoder per call.
_dumps_text: Final = json.JSONEncoder(ensure_ascii=False).encode
_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)
_dumps_tree: Callable[[Any], str]
if _c_encoder is not None:
    # The C encoder JSONEncoder(ensure_ascii=False).encode makes on every call, made once;
    # without its check for cycles, which JSON-parsed values never hold. Same text.
    _encode_tree = _c_encoder(
        None,
        json.JSONEncoder().default,
        json.encoder.encode_basestring,
        None,
        ": ",
        ", ",
        False,
        False,
        True,
    )

    def _dumps_tree(value: Any) -> str:
        return "".join(_encode_tree(value, 0))
else:  # pragma: no cover - CPython has it
    _dumps_tree = _dumps_text
# Writes of an event stream held before they are split: bounds what a stream holds unsplit.
_BATCH_BYTES: Final = 64 * 1024


def one_replacement(text: str) -> str:
    """`text` with each lone surrogate (from a JSON "\\ud800") as ONE U+FFFD.

    No database stores them, and decoding their surrogatepass bytes would make three.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _LONE_SURROGATE.sub("\ufffd", text)
    return text


def is_event_stream(response: web.StreamResponse) -> bool:
    return response.content_type == "text/event-stream"


def stored_text(text: str, truncated: bool, original_bytes: int) -> str:
    """The text a column holds: as is, or a marked JSON envelope around a cut prefix.

    The envelope keeps the column valid JSON and says plainly that, and by how much, the
    body was cut: `{"truncated": true, "original_bytes": N, "prefix": "..."}`.
    """
    if not truncated:
        return text
    return json.dumps(
        {"truncated": True, "original_bytes": original_bytes, "prefix": text},
        ensure_ascii=False,
    )


def body_text(data: bytes, limit: int) -> tuple[str, bool]:
    """Decode a body for storage, cut to `limit` bytes; (text, truncated)."""
    truncated = len(data) > limit
    if truncated:
        data = data[:limit]
    # "replace": a body that is not UTF-8 is still stored (and visibly so), never an error.
    return data.decode("utf-8", "replace"), truncated


@dataclass(slots=True)
class CapturedBody:
    """A reply as it will be stored: its text, its summary, and the assembled content."""

    text: str | None
    truncated: bool
    summary: CompletionSummary
    content: str | None = None
    stream_error: Any = None
    #: The reply as a JSON value (the assembled chat.completion of a stream), when it was
    #: parsed whole: what lineage reads, so the body is not parsed a second time.
    reply: Any = None


class ResponseCapture:
    """Per-request tee of a streamed reply (one instance per call, never shared)."""

    __slots__ = (
        "_assembler",
        "_batch",
        "_batch_bytes",
        "_in_parser",
        "_limit",
        "_max_event_bytes",
        "_parser",
        "_raw",
        "_raw_size",
        "_sent",
        "_split_any",
        "_tail",
        "before_eof",
        "first_byte_at",
        "sse",
        "write_error",
    )

    def __init__(self, *, limit: int, sse: bool = False) -> None:
        self._limit = limit
        self.sse = False
        self._parser: SSEParser | None = None
        self._assembler: ChatStreamAssembler | None = None
        self._batch: list[bytes] | None = None
        self._batch_bytes = 0
        self._sent = 0
        if sse:
            self._start_sse()
        self._raw: list[bytes] = []
        self._raw_size = 0
        self.first_byte_at: float | None = None
        self.write_error: BaseException | None = None
        #: Awaited before the end of the body is sent (sync durability commits there, so
        #: the records are stored by the time the client has the whole reply).
        self.before_eof: Callable[[], Awaitable[None]] | None = None

    def attach(self, response: web.StreamResponse) -> None:
        """Wrap the response's writes; called from `on_response_prepare`."""
        if is_event_stream(response) and not self.sse:
            self._start_sse()
        send = response.write
        send_eof = response.write_eof

        async def write(data: bytes | bytearray | memoryview) -> None:
            if self.first_byte_at is None and data:
                self.first_byte_at = time.perf_counter()
            try:
                await send(data)
            except (ConnectionError, OSError) as exc:
                # Seen here even when the handler swallows it: the client went away.
                self.write_error = exc
                raise
            self._feed(data)

        async def write_eof(data: bytes = b"") -> None:
            if data:
                if self.first_byte_at is None:
                    self.first_byte_at = time.perf_counter()
                self._feed(data)
            if self.before_eof is not None:
                hook, self.before_eof = self.before_eof, None
                try:
                    await hook()
                except Exception:
                    # Recording must never cut off a reply the client is receiving.
                    log.exception("cannot record a streamed reply before its end")
            try:
                await send_eof(data)
            finally:
                # The response stops reaching back to the tee: no reference cycle for the
                # garbage collector to find (write_eof again, or a write, does as aiohttp does).
                attrs = vars(response)
                attrs.pop("write", None)
                attrs.pop("write_eof", None)

        # Instance attributes shadow the methods for this one response only.
        response.write = write  # type: ignore[method-assign]
        response.write_eof = write_eof  # type: ignore[method-assign]

    def _start_sse(self) -> None:
        self.sse = True
        self._max_event_bytes = max(self._limit, 64 * 1024)
        # Text past the limit would be cut from the stored record anyway: not keeping it
        # bounds the memory a long reply takes while it streams.
        self._assembler = ChatStreamAssembler(max_raw_bytes=self._limit, max_text_chars=self._limit)
        self._batch = []
        # The start of an event still arriving, after the last event split.
        self._tail = b""
        # The parser holds part of an event: what follows must go through it.
        self._in_parser = False
        # Events were split already: the stream is past its start (and any BOM).
        self._split_any = False

    @property
    def bytes_sent(self) -> int:
        return self._sent + self._batch_bytes

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Take bytes that were sent some other way (a whole body)."""
        batch = self._batch
        if batch is not None:
            # bytes as they are; a handler's reusable buffer is copied.
            batch.append(data if type(data) is bytes else bytes(data))
            self._batch_bytes += len(data)
            if self._batch_bytes > _BATCH_BYTES:
                self._split()
            return
        self._sent += len(data)
        if self._raw_size < self._limit:
            chunk = bytes(data[: self._limit - self._raw_size])
            self._raw.append(chunk)
            self._raw_size += len(chunk)

    _feed = feed  # one call per write, the hot path

    def _split(self) -> None:
        """Take the writes held so far: events out to the assembler, the rest kept."""
        batch, assembler = self._batch, self._assembler
        if not batch or assembler is None:
            return
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        batch.clear()
        self._sent += self._batch_bytes
        self._batch_bytes = 0
        if self._in_parser:
            self._parse(data)
            return
        if self._tail:
            data = self._tail + data
        split = split_data_events(data, self._max_event_bytes)
        if split is None:
            self._tail = b""
            self._parse(data)
            return
        payloads, tail = split
        if payloads:
            self._split_any = True
            assembler.feed_payloads(payloads)
        if len(tail) > _BATCH_BYTES:
            # One event in many writes: the parser holds it without copying it again.
            self._tail = b""
            self._parse(tail)
        else:
            self._tail = tail

    def _parse(self, data: bytes) -> None:
        """What `split_data_events` cannot take, event by event."""
        assert self._assembler is not None
        parser = self._parser
        if parser is None:
            parser = SSEParser(max_event_bytes=self._max_event_bytes, keep_cut_events=True)
            if self._split_any:
                parser.feed_data(b"\n")  # a blank line: past the stream's start, no BOM
            self._parser = parser
        for event in parser.feed_data(data):
            self._assembler.feed_data(event)
        self._in_parser = not parser.between_events

    def result(self) -> CapturedBody:
        """What was sent so far, assembled (callable at any point, e.g. after a disconnect)."""
        self._split()
        if self._assembler is None:
            text, truncated = body_text(b"".join(self._raw), self._limit)
            truncated = truncated or self.bytes_sent > self._limit
            whole = None if truncated else _parse(text)
            return CapturedBody(
                text=stored_text(text, truncated, self.bytes_sent),
                truncated=truncated,
                summary=_EMPTY_SUMMARY if truncated else completion_summary(whole),
                reply=whole,
            )
        assembled = self._assembler.result(raw_events=False)
        # The completion would lack a cut event entirely: the events' prefix shows it.
        if (
            assembled.openai_shaped
            and assembled.completion is not None
            and not assembled.events_cut
        ):
            reply: Any = assembled.completion
            text = _dumps_tree(reply)
            choices = assembled.completion.get("choices") or [{}]
            message = choices[0].get("message") or {}
            content = message.get("content")
        else:
            reply = None
            text = _dumps_text(self._assembler.result().raw_events)
            content = None
        # JSON "\ud800" in a reply must not cost the call its record.
        text = one_replacement(text)
        encoded = text.encode("utf-8")
        # Cut while streaming (text past the limit was never kept), or too long to store.
        overflowed = self._parser is not None and self._parser.overflowed
        cut = (
            assembled.text_truncated
            or overflowed
            or (assembled.raw_truncated and (assembled.events_cut or not assembled.openai_shaped))
        )
        truncated = cut or len(encoded) > self._limit
        if truncated:
            prefix = encoded[: self._limit].decode("utf-8", "ignore")
            text = stored_text(prefix, True, self.bytes_sent if cut else len(encoded))
        return CapturedBody(
            text=text,
            truncated=truncated,
            summary=assembled.summary,
            content=one_replacement(content) if isinstance(content, str) else None,
            stream_error=assembled.error,
            reply=None if truncated else reply,
        )


def _parse(text: str) -> Any:
    """The JSON value of a whole body, or None when it is not JSON."""
    try:
        return json_loads(text)
    except (ValueError, RecursionError):
        return None


def summarize_body(data: bytes, limit: int, *, sse: bool = False) -> CapturedBody:
    """A non-streamed reply body as stored: the text as sent, its usage and finish_reason.

    An event stream sent whole (a `web.Response` with `text/event-stream`) is assembled
    like a streamed one.
    """
    if sse:
        capture = ResponseCapture(limit=limit, sse=True)
        capture.feed(data)
        return capture.result()
    text, truncated = body_text(data, limit)
    reply = None if truncated else _parse(text)
    summary = _EMPTY_SUMMARY if truncated else completion_summary(reply)
    return CapturedBody(text=text, truncated=truncated, summary=summary, reply=reply)


def response_body(
    response: web.StreamResponse | None, capture: ResponseCapture | None, limit: int
) -> CapturedBody | None:
    """The reply of a call as stored: what the tee saw, else a whole `web.Response` body."""
    if capture is not None:
        return capture.result()
    if isinstance(response, web.Response):
        data = response.body
        if isinstance(data, (bytes, bytearray)):
            if is_event_stream(response):
                return summarize_body(bytes(data), limit, sse=True)
            body = summarize_body(bytes(data), limit)
            body.text = stored_text(body.text or "", body.truncated, len(data))
            return body
    return None
