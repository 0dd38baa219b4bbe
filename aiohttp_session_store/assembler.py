"""Rebuild, from the SSE events of a streamed OpenAI chat completion, the non-streamed reply.

`ChatStreamAssembler` takes the events one at a time and merges the `chat.completion.chunk`
objects into the `chat.completion` object the same call would have returned unstreamed:
content and reasoning joined, tool calls assembled by index, each choice's own finish_reason
and the usage when the stream carried one. `completion_summary` reads the token counts and
finish_reason off such an object, whichever way it was obtained.

Here: the paths events take (`feed_data` one at a time, `feed_payloads` a batch, runs of
repeated chunks merged at once) and the raw events kept; the per-choice state and merge
rules are in `choice_state`, `completion_summary` and `json_loads` in `completion`.

Public API (`from aiohttp_session_store import ChatStreamAssembler, SSEParser`): to learn
what a streamed reply said, e.g. to store or forward the whole text::

    parser, assembler = SSEParser(), ChatStreamAssembler(max_text_chars=1 << 20)
    for chunk in chunks:
        for event in parser.feed(chunk):
            assembler.feed(event)
    reply = assembler.result()
    reply.completion  # the chat.completion object (None if no event was a chat chunk)
    assembler.content  # choice 0's text so far, cheap to ask again while streaming
    reply.summary.total_tokens, reply.summary.finish_reason
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .choice_state import HEADER_KEYS, Budget, Choice, build_completion, text_target
from .chunk_runs import run_values, template
from .completion import CompletionSummary, as_count, completion_summary, json_loads
from .sse import SSEEvent, TruncatedData

__all__ = (
    "AssembledStream",
    "ChatStreamAssembler",
    "CompletionSummary",
    "completion_summary",
    "json_loads",
)


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(slots=True)
class AssembledStream:
    """What a stream amounted to, as far as it went."""

    #: At least one event was a chat.completion.chunk-shaped JSON object.
    openai_shaped: bool
    #: The assembled chat.completion object; None if the stream was not OpenAI-shaped.
    completion: dict[str, Any] | None
    #: The data of each event in order, up to the assembler's limits (see `raw_truncated`).
    raw_events: list[str]
    #: "[DONE]" was seen.
    done: bool
    #: The value of the last `{"error": ...}` event, if the stream carried one.
    error: Any | None
    summary: CompletionSummary
    #: Events were left out of `raw_events` to stay within the limits; it holds a prefix.
    raw_truncated: bool = False
    #: Text was left out of `completion` to stay within `max_text_chars`: it holds a prefix.
    text_truncated: bool = False
    #: An event came cut (`SSEEvent.truncated`): `completion` lacks it, `raw_events` ends
    #: with what of it fitted.
    events_cut: bool = False


class ChatStreamAssembler:
    """Feed it every event of one streamed reply; `result()` says what the reply was.

    Never raises on what the stream contains: events that are not JSON, not objects, or not
    shaped like chat chunks are kept only in `raw_events`, and malformed parts of a chunk are
    skipped. `result()` may be called at any point, e.g. when the client went away mid-stream.
    """

    __slots__ = (
        "_budget",
        "_choices",
        "_done",
        "_error",
        "_events_cut",
        "_header",
        "_header_missing",
        "_max_raw_bytes",
        "_max_raw_events",
        "_openai_shaped",
        "_raw",
        "_raw_bytes",
        "_raw_truncated",
        "_repeat",
        "_repeat_tries",
        "_usage",
    )

    def __init__(
        self,
        *,
        max_raw_events: int = 10_000,
        max_raw_bytes: int = 1 << 20,
        max_text_chars: int | None = None,
    ) -> None:
        if max_raw_events < 0 or max_raw_bytes < 0:
            raise ValueError("max_raw_events and max_raw_bytes cannot be negative")
        if max_text_chars is not None and max_text_chars < 0:
            raise ValueError("max_text_chars cannot be negative")
        self._budget = Budget(max_text_chars)
        self._max_raw_events = max_raw_events
        self._max_raw_bytes = max_raw_bytes
        self._raw: list[str | bytes] = []
        self._raw_bytes = 0
        self._raw_truncated = False
        self._openai_shaped = False
        self._done = False
        self._events_cut = False
        self._error: Any | None = None
        self._header: dict[str, Any] = {}
        # The header keys no chunk has carried yet: only these are looked up.
        self._header_missing: tuple[str, ...] = HEADER_KEYS
        self._usage: dict[str, Any] | None = None
        self._choices: dict[int, Choice] = {}
        # The chunk later ones repeat but for their text (see chunk_runs): its bytes around
        # that text, the list the text goes to, and the budget it is charged to.
        self._repeat: tuple[bytes, bytes, list[str], Budget] | None = None
        # Templates learned that no chunk has repeated yet: a stream whose chunks never
        # repeat stops paying for learning them.
        self._repeat_tries = 8

    def feed(self, event: SSEEvent) -> None:
        """Take one event: "[DONE]" marks the end, chat chunks are merged, the rest kept raw."""
        self.feed_data(TruncatedData(event.data) if event.truncated else event.data)

    def feed_data(self, data: str) -> None:
        """Take one event's data, as `SSEParser.feed_data` gives it (cheaper than `feed`)."""
        if isinstance(data, TruncatedData):
            # A cut JSON object cannot be merged; its prefix is what there is to keep.
            self._events_cut = True
            self._keep_raw(data, cut=True)
            return
        # `_keep_raw`'s common case inline: this runs for every event of every stream.
        size = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
        if (
            not self._raw_truncated
            and len(self._raw) < self._max_raw_events
            and self._raw_bytes + size <= self._max_raw_bytes
        ):
            self._raw.append(data)
            self._raw_bytes += size
        else:
            self._keep_raw(data)
        self._merge_text(data)

    def feed_payloads(self, payloads: list[bytes]) -> None:
        """As `feed_data` for each event's data given as UTF-8 bytes, in one go.

        Invalid UTF-8 reads as if replaced, as `SSEParser` does. The data hold no line
        break (what `split_data_events` gives). Chunks that repeat a known one but for their
        text are merged by the run, without a dict or a parse each.
        """
        if not payloads:
            return
        joined = b"\n".join(payloads)
        self._keep_raw_payloads(payloads, joined)
        i, count = 0, len(payloads)
        at = 0  # where payloads[i] starts in `joined`
        learned_at = -1
        while i < count:
            repeat = self._repeat
            if repeat is not None:
                run = run_values(payloads, i, repeat[0], repeat[1], joined, at)
                if run is not None and run[0]:
                    values, at = run
                    repeat[3].extend(repeat[2], values)
                    self._repeat_tries = 8
                    i += len(values)
                    continue
                if run is not None:
                    # Looked like a repeat but the run's bytes were refused: learn anew
                    # rather than try the same bytes again from the next chunk.
                    self._repeat = None
            payload = payloads[i]
            if payload == b"[DONE]":
                self._done = True
                i += 1
                at += 7
                continue
            parsed = self._parse_chunk(payload.decode("utf-8", "replace"))
            if parsed is None:
                i += 1
                at += len(payload) + 1
                continue
            chunk = parsed[0]
            if self._repeat_tries > 0 and learned_at != i and self._learn_repeat(payload, chunk):
                learned_at = i  # the run from here takes this chunk too
                continue
            i += 1
            at += len(payload) + 1
            self._merge_chunk(chunk, parsed[1])

    def _keep_raw_payloads(self, payloads: list[bytes], joined: bytes) -> None:
        size = len(joined) - len(payloads) + 1
        if (
            not self._raw_truncated
            and len(self._raw) + len(payloads) <= self._max_raw_events
            and self._raw_bytes + size <= self._max_raw_bytes
            and _is_utf8(joined)
        ):
            # Kept as bytes, decoded only if the raw events are asked for.
            self._raw.extend(payloads)
            self._raw_bytes += size
            return
        for payload in payloads:
            self._keep_raw(payload.decode("utf-8", "replace"))

    def _learn_repeat(self, payload: bytes, chunk: dict[str, Any]) -> bool:
        """Take `chunk` (not merged) as the one later chunks repeat, if its only effect is text."""
        if not self._openai_shaped:
            return False
        found = text_target(chunk, self._choices, self._header_missing)
        if found is None or not found[1]:
            return False
        target, text, key = found
        span = template(payload, text, key)
        if span is None:
            return False
        self._repeat_tries -= 1
        self._repeat = (span[0], span[1], target, self._budget)
        return True

    def _merge_text(self, data: str) -> None:
        parsed = self._parse_chunk(data)
        if parsed is not None:
            self._merge_chunk(*parsed)

    def _parse_chunk(self, data: str) -> tuple[dict[str, Any], int] | None:
        """The JSON object an event's data holds and its length (None for anything else).

        Notes "[DONE]" on the way.
        """
        # Only an object can be a chunk or an error; skip json.loads for anything else.
        # A chunk starts with "{" as sent: no stripped copy of it (JSON allows the rest).
        text = data
        if data[:1] != "{":
            text = data.strip()
            if text == "[DONE]":
                self._done = True
                return None
            if not text.startswith("{"):
                return None
        try:
            obj = json_loads(text)
        except (ValueError, RecursionError):
            return None
        return (obj, len(text)) if isinstance(obj, dict) else None

    def _merge_chunk(self, obj: dict[str, Any], size: int) -> None:
        """Merge a parsed event; `size`: the length of its data (what logprobs may cost)."""
        error = obj.get("error")
        if error is not None:
            self._error = error
        choices = obj.get("choices")
        if isinstance(choices, list) or obj.get("object") == "chat.completion.chunk":
            self._openai_shaped = True
            self._merge(obj, choices if isinstance(choices, list) else [], size)

    @property
    def content(self) -> str:
        """Choice 0's content so far ("" before any)."""
        choice = self._choice_zero()
        if choice is None or not choice.content:
            return ""
        parts = choice.content
        if len(parts) > 1:
            # Keep the join: asking again before more content arrives is then free.
            parts[:] = ["".join(parts)]
        return parts[0]

    def result(self, *, raw_events: bool = True) -> AssembledStream:
        """The stream so far, with the completion assembled from it.

        `raw_events=False` leaves `raw_events` empty, for a caller that reads them only when
        the stream was not a chat completion (and then asks again).
        """
        completion = (
            build_completion(self._header, self._choices, self._usage)
            if self._openai_shaped
            else None
        )
        return AssembledStream(
            openai_shaped=self._openai_shaped,
            completion=completion,
            raw_events=[
                raw if isinstance(raw, str) else raw.decode("utf-8", "replace") for raw in self._raw
            ]
            if raw_events
            else [],
            done=self._done,
            error=self._error,
            summary=completion_summary(completion),
            raw_truncated=self._raw_truncated,
            text_truncated=self._budget.exhausted,
            events_cut=self._events_cut,
        )

    def _keep_raw(self, data: str, *, cut: bool = False) -> None:
        if self._raw_truncated:
            # Once one is left out, keep none after it: a prefix is easier to read than holes.
            return
        size = len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))
        if len(self._raw) >= self._max_raw_events or self._raw_bytes + size > self._max_raw_bytes:
            self._raw_truncated = True
            room = self._max_raw_bytes - self._raw_bytes
            if not cut or room <= 0 or len(self._raw) >= self._max_raw_events:
                return
            # A cut event ends the kept prefix with as much of it as fits.
            data = data.encode("utf-8", "surrogatepass")[:room].decode("utf-8", "ignore")
            size = room
        self._raw.append(data)
        self._raw_bytes += size

    def _merge(self, chunk: dict[str, Any], choices: list[Any], size: int) -> None:
        """Merge one chunk; `size`: its JSON's length, what its logprobs may cost at most."""
        missing = self._header_missing
        if missing:
            header = self._header
            found = False
            for key in missing:
                value = chunk.get(key)
                if value is not None:
                    header[key] = value
                    found = True
            if found:
                self._header_missing = tuple(k for k in HEADER_KEYS if k not in header)
        usage = chunk.get("usage")
        # Some servers repeat a cumulative usage on every chunk: the last one is the total.
        if isinstance(usage, dict):
            self._usage = usage
        elif len(choices) == 1 and self._content_only(choices[0]):
            return
        # Chunks come from json.loads: objects are dicts, and isinstance(x, dict) is a C type
        # check where isinstance(x, Mapping) is an ABC lookup, several per event.
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            index = as_count(choice.get("index"))
            if index is None:
                index = position
            state = self._choices.get(index)
            if state is None:
                if not self._budget.open_part():
                    continue
                state = self._choices[index] = Choice(self._budget)
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                # A server that sends its whole reply as one unstreamed object in the stream.
                delta = choice.get("message")
            if isinstance(delta, dict):
                state.merge(delta)
            finish_reason = choice.get("finish_reason")
            if isinstance(finish_reason, str):
                state.finish_reason = finish_reason
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict):
                # Charged once per chunk, by the chunk's whole length: a cheap upper bound.
                state.merge_logprobs(logprobs, size)
                size = 0

    def _content_only(self, choice: Any) -> bool:
        """The commonest chunk, one choice's next piece of content, merged; else False."""
        if type(choice) is not dict:
            return False
        delta = choice.get("delta")
        if type(delta) is not dict or len(delta) != 1:
            return False
        content = delta.get("content")
        index = choice.get("index", 0)
        if type(content) is not str or type(index) is not int:
            return False
        if choice.get("finish_reason") is not None or choice.get("logprobs") is not None:
            return False
        state = self._choices.get(index)
        if state is None:
            return False
        if state.budget.take(content):
            state.content.append(content)
        return True

    def _choice_zero(self) -> Choice | None:
        choice = self._choices.get(0)
        if choice is None and self._choices:
            choice = self._choices[min(self._choices)]
        return choice
