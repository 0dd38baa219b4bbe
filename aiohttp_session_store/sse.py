"""Incremental Server-Sent Events parser: bytes in any chunking, complete events out (WHATWG).

The rules followed are those of the HTML Living Standard, "Parsing an event stream":
UTF-8 with replacement of invalid sequences, one leading BOM dropped, lines ended by CRLF, LF
or CR, comments (lines starting with ":") ignored, `field:value` with one leading space of the
value dropped, `data` lines joined with "\\n", `id` values containing NUL ignored, `retry`
taken only when it is ASCII digits, an event dispatched on a blank line when it has at least
one `data` line, and an unterminated event at the end of the stream discarded.

Two deliberate additions to the standard: `SSEEvent.retry` carries a `retry` field given in
the event's own block (the standard only updates the connection's reconnection time, which
this parser also keeps as `SSEParser.retry`), and a size guard that drops any event whose
lines exceed `max_event_bytes` instead of buffering it (or, with `keep_cut_events=True`,
dispatches its first `max_event_bytes` bytes marked `truncated`).

Public API (`from aiohttp_session_store import SSEParser`): a proxy that reads an upstream
event stream feeds each chunk it receives and acts on whole events::

    parser = SSEParser()
    async for chunk in upstream.content.iter_any():
        for event in parser.feed(chunk):
            if event.data == "[DONE]":
                break
            chunk_obj = json.loads(event.data)
    parser.close()  # the stream ended: an unterminated last event is discarded
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

__all__ = ("SSEEvent", "SSEParser", "TruncatedData", "split_data_events")

_BOM: Final = b"\xef\xbb\xbf"
_LF: Final = 0x0A
_CR: Final = 0x0D
_COLON: Final = 0x3A


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event.

    `id` is the stream's last event id at dispatch time, as the standard defines it: it
    persists across events until another `id` field changes it (an empty `id:` sets it to
    ""), and is None only while no `id` field has been seen.
    """

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None
    #: Only with `keep_cut_events`: the event exceeded `max_event_bytes` and `data` holds
    #: what its lines said within that many bytes.
    truncated: bool = False


class TruncatedData(str):
    """From `SSEParser.feed_data`: the data of an event cut at `max_event_bytes`."""

    __slots__ = ()


class SSEParser:
    """Feed it the bytes of one event stream in whatever chunks they arrive; get events back.

    The work is done on bytes: CR and LF never occur inside a UTF-8 multibyte sequence, so
    lines can be cut on the raw bytes and each field value decoded on its own, which makes a
    character split across chunks a non-issue and lets the size guard count real bytes.
    """

    __slots__ = (
        "_at_start",
        "_cr_pending",
        "_data",
        "_event_bytes",
        "_event_retry",
        "_event_type",
        "_head",
        "_keep_cut",
        "_partial",
        "_skipping",
        "_truncated",
        "bytes_seen",
        "last_event_id",
        "max_event_bytes",
        "overflowed",
        "retry",
    )

    def __init__(self, *, max_event_bytes: int = 1 << 20, keep_cut_events: bool = False) -> None:
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be at least 1, not {max_event_bytes}")
        self.max_event_bytes = max_event_bytes
        # A recorder keeps a cut prefix of an oversized event (and says so) rather than
        # letting it vanish; a client acting on events wants none or all of one.
        self._keep_cut = keep_cut_events
        #: True once an event was dropped for exceeding `max_event_bytes`.
        self.overflowed = False
        #: Every byte passed to `feed`, BOM and line terminators included.
        self.bytes_seen = 0
        #: The standard's "last event ID string"; None until an `id` field is seen.
        self.last_event_id: str | None = None
        #: The latest reconnection time (ms) the stream asked for, if any.
        self.retry: int | None = None
        self._reset_stream()

    def _reset_stream(self) -> None:
        # Up to 2 bytes held back at the start while they could still be the start of a BOM.
        self._head = b""
        self._at_start = True
        # The previous chunk ended in CR: a LF opening the next chunk is the same line break.
        self._cr_pending = False
        # The unterminated last line; bytearray so a line arriving in many pieces stays linear.
        self._partial = bytearray()
        # After an overflow: discard lines until the blank line that ends the oversized event.
        self._skipping = False
        self._reset_event()

    def _reset_event(self) -> None:
        self._data: list[str] = []
        self._event_type = ""
        self._event_retry: int | None = None
        self._event_bytes = 0
        self._truncated = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> list[SSEEvent]:
        """Parse the next chunk of the stream; return the events it completed, in order."""
        events: list[SSEEvent] = self._parse(chunk, True)
        return events

    def feed_data(self, chunk: bytes | bytearray | memoryview) -> list[str]:
        """As `feed`, but only the `data` of each event: no object made per event.

        For a consumer that ignores event types and ids (a recorder of chat streams). The
        data of an event cut by `keep_cut_events` comes as a `TruncatedData` (a str).
        """
        data = bytes(chunk)
        size = len(data)
        # The commonest write of a chat stream: one whole `data:` event, arriving while the
        # parser is between events. Same result as the general path, a fraction of its work.
        if (
            data.endswith(b"\n\n")
            and data.startswith(b"data: ")
            and data.find(b"\n") == size - 2
            and data.find(b"\r") < 0
            and not self._at_start
            and not self._cr_pending
            and not self._partial
            and not self._skipping
            and not self._data
            and self._event_bytes + size - 2 <= self.max_event_bytes
        ):
            self.bytes_seen += size
            if self._event_bytes or self._event_type or self._event_retry is not None:
                self._reset_event()
            return [data[6:-2].decode("utf-8", "replace")]
        datas: list[str] = self._parse(data, False)
        return datas

    def _parse(self, chunk: bytes | bytearray | memoryview, whole: bool) -> list[Any]:
        data = bytes(chunk)
        self.bytes_seen += len(data)
        if self._at_start:
            data = self._head + data
            if len(data) < len(_BOM) and _BOM.startswith(data):
                self._head = data
                return []
            self._head = b""
            self._at_start = False
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        if self._cr_pending and data:
            self._cr_pending = False
            if data[0] == _LF:
                data = data[1:]
        if not data:
            return []
        # find(), not `in`: the same answer at half the cost on every write.
        if data.find(b"\r") >= 0:
            # A trailing CR already ends its line here (no waiting for the next chunk, which
            # would delay the event); the flag only stops a following LF making a blank line.
            self._cr_pending = data[-1] == _CR
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = data.split(b"\n")
        tail = lines.pop()
        if not lines:
            self._extend_partial(tail)
            return []
        if self._partial:
            lines[0] = bytes(self._partial) + lines[0]
            self._partial.clear()
        events: list[Any] = []
        dispatch = self._dispatch if whole else self._dispatch_data
        for line in lines:
            if self._skipping:
                if not line:
                    self._skipping = False
                    if self._truncated and self._data:
                        events.append(dispatch())
                    else:
                        self._reset_event()
                continue
            if not line:
                if self._data:
                    events.append(dispatch())
                else:
                    self._reset_event()
                continue
            if line[0] == _COLON:
                continue
            room = self.max_event_bytes - self._event_bytes
            self._event_bytes += len(line)
            if self._event_bytes > self.max_event_bytes:
                self._overflow(line[:room])
                continue
            if line.startswith(b"data: "):  # the commonest field, without a call
                self._data.append(line[6:].decode("utf-8", "replace"))
                continue
            self._field(line)
        if tail:
            self._extend_partial(tail)
        return events

    @property
    def between_events(self) -> bool:
        """Nothing of an event is held: the next byte fed starts a new one (past any BOM)."""
        return not (
            self._at_start
            or self._cr_pending
            or self._partial
            or self._skipping
            or self._data
            or self._event_bytes
            or self._event_type
            or self._event_retry is not None
        )

    def close(self) -> list[SSEEvent]:
        """End of the stream: discard any unterminated event, as the standard requires.

        Returns the events the end of the stream completes, which with this parser is always
        none: a final CR is acted on when it arrives rather than held back. The parser may
        be fed again afterwards as a new stream (a reconnection): the BOM check restarts and
        `last_event_id`, `retry`, `overflowed` and `bytes_seen` carry over.
        """
        self._reset_stream()
        return []

    def _extend_partial(self, data: bytes) -> None:
        partial = self._partial
        if self._skipping:
            # Only whether the line is non-empty matters: its end must not look blank.
            if not partial:
                partial += data[:1]
            return
        if partial[:1] == b":" or (not partial and data[:1] == b":"):
            # A comment is ignored whatever it says, so a long one is never buffered.
            if not partial:
                partial += b":"
            return
        if self._event_bytes + len(partial) + len(data) > self.max_event_bytes:
            room = self.max_event_bytes - self._event_bytes
            self._overflow(bytes(partial[:room]) + data[: max(room - len(partial), 0)])
            partial.clear()
            partial += b"x"
            return
        partial += data

    def _overflow(self, cut_line: bytes) -> None:
        """The event went past `max_event_bytes`: `cut_line` is what of it fits."""
        self.overflowed = True
        self._skipping = True
        if not self._keep_cut:
            self._reset_event()
            return
        self._truncated = True
        if cut_line:
            # The cut may split a character: a partial one at the end is dropped, not
            # replaced, so the prefix holds only what was really sent.
            self._field(_whole_chars(cut_line))

    def _field(self, line: bytes) -> None:
        colon = line.find(b":")
        if colon < 0:
            name = line
            value = b""
        else:
            name = line[:colon]
            start = colon + 1
            if line[start : start + 1] == b" ":
                start += 1
            value = line[start:]
        # Names compare as bytes: a name with invalid UTF-8 could only decode to something
        # containing U+FFFD, which matches none of these anyway.
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event_type = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\x00" not in value:
                self.last_event_id = value.decode("utf-8", "replace")
        elif name == b"retry" and value.isdigit():  # bytes.isdigit: ASCII digits only
            try:
                retry = int(value)
            except ValueError:  # more digits than int() accepts: not a usable delay either
                return
            self.retry = self._event_retry = retry

    def _dispatch_data(self) -> str:
        parts = self._data
        data = parts[0] if len(parts) == 1 else "\n".join(parts)
        if self._truncated:
            data = TruncatedData(data)
        self._reset_event()
        return data

    def _dispatch(self) -> SSEEvent:
        event = SSEEvent(
            "\n".join(self._data),
            self._event_type or "message",
            self.last_event_id,
            self._event_retry,
            self._truncated,
        )
        self._reset_event()
        return event


def split_data_events(data: bytes, max_event_bytes: int) -> tuple[list[bytes], bytes] | None:
    """A chat stream's usual shape split in a few calls, whatever the number of events.

    When every complete event in `data` is a single `data: ` line (LF or CRLF line ends)
    within `max_event_bytes`, returns each one's data, undecoded, and the rest of `data` (an
    event still arriving, to be put in front of what comes next); else None, and an
    `SSEParser` must take `data`. `data` starts where an event may start; at the start of a
    stream a BOM makes it None. Decoded with replacement, the data are what
    `SSEParser.feed_data` gives for the same bytes.
    """
    if data.find(b"\r") >= 0:
        data = data.replace(b"\r\n", b"\n")
        if data.find(b"\r") >= 0:  # a lone CR ends a line too: rare, the parser knows it
            return None
    end = data.rfind(b"\n\n") + 2
    if end < 2:
        return [], data
    body = data[:end] if end < len(data) else data
    if body[:6] != b"data: ":
        return None
    payloads = body[6:-2].split(b"\n\ndata: ")
    # Every line break was in a separator: each event is one `data: ` line, then a blank one.
    if b"".join(payloads).find(b"\n") >= 0:
        return None
    if len(body) > max_event_bytes and max(map(len, payloads)) + 6 > max_event_bytes:
        return None
    return payloads, data[end:]


def _whole_chars(data: bytes) -> bytes:
    """`data` without a UTF-8 sequence cut off at its end."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return data
        if byte >= 0xC0:  # a lead byte: is its sequence whole?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return data if back >= need else data[:-back]
    return data
