"""Rebuild, from the SSE events of a streamed OpenAI chat completion, the non-streamed reply.

`ChatStreamAssembler` takes the events one at a time and merges the `chat.completion.chunk`
objects into the `chat.completion` object the same call would have returned unstreamed:
content and reasoning joined, tool calls assembled by index, each choice's own finish_reason
and the usage when the stream carried one. `completion_summary` reads the token counts and
finish_reason off such an object, whichever way it was obtained.

Over the 400-line guide as one concern: the merge rules per field, the byte budget every
kept part is charged to, and the hot paths events take (`feed_data` one at a time,
`feed_payloads` a batch, with runs of repeated chunks merged at once) are one state machine
whose parts only make sense together.

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

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .chunk_runs import probe, run_values, token_span
from .sse import SSEEvent, TruncatedData

__all__ = (
    "AssembledStream",
    "ChatStreamAssembler",
    "CompletionSummary",
    "completion_summary",
    "json_loads",
)

_fast_loads: Callable[[str | bytes], Any] | None
try:  # the "speed" extra: several times faster on the small objects of a stream
    _fast_loads = importlib.import_module("orjson").loads
except ImportError:  # pragma: no cover - depends on the environment
    _fast_loads = None


def json_loads(text: str | bytes) -> Any:
    """json.loads(text), by orjson when it is installed and agrees.

    What orjson refuses and json takes (NaN, lone surrogates, huge integers) goes to the
    stdlib, so what is assembled never depends on which parser ran.
    """
    if _fast_loads is not None:
        try:
            return _fast_loads(text)
        except ValueError:
            pass
    return json.loads(text)


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# The delta fields whose text a choice joins, and the list each goes to.
_TEXT_FIELDS = {
    "content": "content",
    "reasoning_content": "reasoning",
    "reasoning": "reasoning",
    "refusal": "refusal",
}

# Copied from the first chunk that has them; the rest of a chunk's top level is per-chunk.
_HEADER_KEYS = ("id", "created", "model", "system_fingerprint", "service_tier")


@dataclass(slots=True)
class CompletionSummary:
    """The columns a response record takes from a completion: token counts, finish_reason."""

    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    finish_reason: str | None


def _count(value: object) -> int | None:
    # bool is an int subclass, but `true` is not a token count.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _choice_zero(choices: object) -> Mapping[str, Any] | None:
    if not isinstance(choices, list):
        return None
    first: Mapping[str, Any] | None = None
    for choice in choices:
        if not isinstance(choice, (dict, Mapping)):
            continue
        if _count(choice.get("index")) == 0:
            return choice
        if first is None:
            first = choice
    return first


def completion_summary(body: object) -> CompletionSummary:
    """Token counts from `body["usage"]` and the finish_reason of choice 0 (else the first).

    `body` is a parsed JSON reply and may be anything: whatever is missing or of the wrong
    type reads as None, never as an error. A count of 0 stays 0.
    """
    # dict first: an exact type check, where Mapping alone is an ABC lookup.
    if not isinstance(body, (dict, Mapping)):
        return CompletionSummary(None, None, None, None)
    usage = body.get("usage")
    if not isinstance(usage, (dict, Mapping)):
        usage = {}
    choice = _choice_zero(body.get("choices"))
    finish_reason = choice.get("finish_reason") if choice is not None else None
    return CompletionSummary(
        prompt_tokens=_count(usage.get("prompt_tokens")),
        completion_tokens=_count(usage.get("completion_tokens")),
        total_tokens=_count(usage.get("total_tokens")),
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
    )


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


#: Characters of budget per choice or tool call a stream may open (each is an object of
#: its own, counted apart from the text so a small budget still holds a few).
_PART_COST = 64


class _Budget:
    """How much (in characters) a stream may still add to its assembled reply.

    Shared by every choice of one stream and charged for everything kept (text, logprobs,
    each new choice and tool call), so a reply longer than the store will keep can never
    grow the proxy's memory without bound; usage and finish reasons still arrive.
    """

    __slots__ = ("exhausted", "left", "parts_left")

    def __init__(self, chars: int | None) -> None:
        self.left = chars
        self.parts_left = None if chars is None else max(8, chars // _PART_COST)
        self.exhausted = False

    def open_part(self) -> bool:
        """May the stream open one more choice or tool call?"""
        if self.parts_left is None:
            return True
        if self.parts_left <= 0:
            self.exhausted = True
            return False
        self.parts_left -= 1
        return True

    def take(self, text: str) -> bool:
        return self.charge(len(text))

    def charge(self, size: int) -> bool:
        if self.left is None:
            return True
        if size > self.left:
            self.exhausted = True
            self.left = 0
            return False
        self.left -= size
        return True


class _ToolCall:
    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: list[str] = []
        self.arguments: list[str] = []


class _Choice:
    __slots__ = (
        "budget",
        "content",
        "finish_reason",
        "function_arguments",
        "function_call",
        "function_name",
        "logprobs",
        "reasoning",
        "refusal",
        "role",
        "tool_calls",
    )

    def __init__(self, budget: _Budget) -> None:
        self.budget = budget
        self.role: str | None = None
        # Non-empty once any content delta came, even "": that is how None and "" differ.
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, _ToolCall] = {}
        self.function_call = False
        self.function_name: list[str] = []
        self.function_arguments: list[str] = []
        self.finish_reason: str | None = None
        self.logprobs: dict[str, Any] | None = None

    def merge(self, delta: Mapping[str, Any]) -> None:
        if not delta:  # the finish chunk's
            return
        role = delta.get("role")
        if self.role is None and isinstance(role, str) and role:
            self.role = role
        content = delta.get("content")
        if isinstance(content, str) and self.budget.take(content):
            self.content.append(content)
        # Some servers send the same text under both names; take one so it is not doubled.
        reasoning = delta.get("reasoning_content")
        if not isinstance(reasoning, str):
            reasoning = delta.get("reasoning")
        if isinstance(reasoning, str) and self.budget.take(reasoning):
            self.reasoning.append(reasoning)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and self.budget.take(refusal):
            self.refusal.append(refusal)
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list):
            for position, call in enumerate(tool_calls):
                if isinstance(call, dict):
                    self._merge_tool_call(position, call)
        function_call = delta.get("function_call")
        if isinstance(function_call, dict):
            self.function_call = True
            name = function_call.get("name")
            if isinstance(name, str) and self.budget.take(name):
                self.function_name.append(name)
            arguments = function_call.get("arguments")
            if isinstance(arguments, str) and self.budget.take(arguments):
                self.function_arguments.append(arguments)

    def _merge_tool_call(self, position: int, call: Mapping[str, Any]) -> None:
        index = _count(call.get("index"))
        call_id = call.get("id")
        if index is None:
            # No index (some non-OpenAI servers): a new id opens a call, else it continues
            # the latest one; a lone first delta falls back to its position in the list.
            if isinstance(call_id, str) and all(c.id != call_id for c in self.tool_calls.values()):
                index = max(self.tool_calls, default=position - 1) + 1
            elif self.tool_calls:
                index = max(self.tool_calls)
            else:
                index = position
        state = self.tool_calls.get(index)
        if state is None:
            if not self.budget.open_part():
                return
            state = self.tool_calls[index] = _ToolCall()
        if state.id is None and isinstance(call_id, str) and call_id:
            state.id = call_id
        call_type = call.get("type")
        if state.type is None and isinstance(call_type, str) and call_type:
            state.type = call_type
        function = call.get("function")
        if isinstance(function, Mapping):
            name = function.get("name")
            if isinstance(name, str) and self.budget.take(name):
                state.name.append(name)
            arguments = function.get("arguments")
            if isinstance(arguments, str) and self.budget.take(arguments):
                state.arguments.append(arguments)

    def merge_logprobs(self, logprobs: Mapping[str, Any], size: int) -> None:
        """Add a chunk's logprobs; `size` is what they cost the budget (their JSON's bound)."""
        # Each chunk carries the logprobs of its own tokens: the lists concatenate.
        if self.budget.exhausted or not self.budget.charge(size):
            return
        if self.logprobs is None:
            self.logprobs = {}
        for key, value in logprobs.items():
            held = self.logprobs.get(key)
            if isinstance(value, list) and isinstance(held, list):
                held.extend(value)
            elif isinstance(value, list):
                self.logprobs[key] = list(value)
            elif value is not None or key not in self.logprobs:
                self.logprobs[key] = value

    def build(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": self.role or "assistant",
            "content": "".join(self.content) if self.content else None,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type or "function",
                    "function": {"name": "".join(call.name), "arguments": "".join(call.arguments)},
                }
                for _, call in sorted(self.tool_calls.items())
            ]
        if self.function_call:
            message["function_call"] = {
                "name": "".join(self.function_name),
                "arguments": "".join(self.function_arguments),
            }
        choice: dict[str, Any] = {
            "index": index,
            "message": message,
            "finish_reason": self.finish_reason,
        }
        if self.logprobs is not None:
            # A copy: the lists keep growing if the stream goes on after this result.
            choice["logprobs"] = {
                key: list(value) if isinstance(value, list) else value
                for key, value in self.logprobs.items()
            }
        return choice


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
        self._budget = _Budget(max_text_chars)
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
        self._header_missing: tuple[str, ...] = _HEADER_KEYS
        self._usage: dict[str, Any] | None = None
        self._choices: dict[int, _Choice] = {}
        # The chunk later ones repeat but for their text (see chunk_runs): its bytes around
        # that text, the list the text goes to, and the budget it is charged to.
        self._repeat: tuple[bytes, bytes, list[str], _Budget] | None = None
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
                    self._merge_run(values, repeat[2], repeat[3])
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

    def _merge_run(self, values: list[Any], target: list[str], budget: _Budget) -> None:
        size = sum(map(len, values))
        if budget.left is None or size <= budget.left:
            if budget.left is not None:
                budget.left -= size
            target.extend(values)
            return
        for value in values:
            if budget.take(value):
                target.append(value)

    def _learn_repeat(self, payload: bytes, chunk: dict[str, Any]) -> bool:
        """Take `chunk` (not merged) as the one later chunks repeat, if its only effect is text."""
        found = self._text_target(chunk)
        if found is None or not found[1]:
            return False
        target, text, key = found
        span = token_span(payload, text)
        if span is None:
            return False
        prefix, suffix = span
        # The string found must be the one that carries the text, not an equal one beside
        # it: written another way, it changes the text and nothing else.
        other, value = probe(prefix, suffix, text)
        try:
            probed = json_loads(other)["choices"][0]["delta"][key]
        except (ValueError, RecursionError, LookupError, TypeError):
            return False
        if probed != value:
            return False
        self._repeat_tries -= 1
        self._repeat = (prefix, suffix, target, self._budget)
        return True

    def _text_target(self, chunk: Any) -> tuple[list[str], str, str] | None:
        """(list, text, key) when merging `chunk` would only add `text` to one choice's list.

        `key` is the delta field that carries it.
        """
        if not self._openai_shaped or type(chunk) is not dict:
            return None
        choices = chunk.get("choices")
        if type(choices) is not list or len(choices) != 1 or chunk.get("error") is not None:
            return None
        if type(chunk.get("usage")) is dict:
            return None
        for key in self._header_missing:
            if chunk.get(key) is not None:
                return None
        choice = choices[0]
        if type(choice) is not dict:
            return None
        delta = choice.get("delta")
        if (
            type(delta) is not dict
            or isinstance(choice.get("finish_reason"), str)
            or isinstance(choice.get("logprobs"), dict)
        ):
            return None
        state = self._choices.get(_count(choice.get("index")) or 0)
        if state is None:
            return None
        found: tuple[list[str], str, str] | None = None
        for key, value in delta.items():
            if value is None:
                continue
            if key == "role":
                # Taken from the first chunk that has one: after that, no effect.
                if state.role is None and isinstance(value, str) and value:
                    return None
                continue
            target = _TEXT_FIELDS.get(key)
            if found is not None or target is None or not isinstance(value, str):
                return None
            found = (getattr(state, target), value, key)
        return found

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
        completion = self._build() if self._openai_shaped else None
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
                self._header_missing = tuple(k for k in _HEADER_KEYS if k not in header)
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
            index = _count(choice.get("index"))
            if index is None:
                index = position
            state = self._choices.get(index)
            if state is None:
                if not self._budget.open_part():
                    continue
                state = self._choices[index] = _Choice(self._budget)
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

    def _choice_zero(self) -> _Choice | None:
        choice = self._choices.get(0)
        if choice is None and self._choices:
            choice = self._choices[min(self._choices)]
        return choice

    def _build(self) -> dict[str, Any]:
        header = self._header
        completion: dict[str, Any] = {
            "id": header.get("id"),
            "object": "chat.completion",
            "created": header.get("created"),
            "model": header.get("model"),
        }
        for key in ("system_fingerprint", "service_tier"):
            if key in header:
                completion[key] = header[key]
        completion["choices"] = [
            choice.build(index) for index, choice in sorted(self._choices.items())
        ]
        if self._usage is not None:
            completion["usage"] = dict(self._usage)
        return completion
