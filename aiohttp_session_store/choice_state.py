"""The state one streamed reply is assembled into: the byte budget every kept part is charged
to, each choice's and tool call's merged parts, and the merge rules of a chunk's delta.
Pure (no I/O).

`text_target` sits beside the merge rules it must agree with: it says when merging a chunk
would only append one string to one choice's list, which is what lets `ChatStreamAssembler`
merge a run of repeated chunks at once (see `chunk_runs`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .completion import as_count

__all__ = (
    "HEADER_KEYS",
    "PART_COST",
    "TEXT_FIELDS",
    "Budget",
    "Choice",
    "ToolCall",
    "build_completion",
    "text_target",
)

# The delta fields whose text a choice joins, and the list each goes to.
TEXT_FIELDS = {
    "content": "content",
    "reasoning_content": "reasoning",
    "reasoning": "reasoning",
    "refusal": "refusal",
}

# Copied from the first chunk that has them; the rest of a chunk's top level is per-chunk.
HEADER_KEYS = ("id", "created", "model", "system_fingerprint", "service_tier")

#: Characters of budget per choice or tool call a stream may open (each is an object of
#: its own, counted apart from the text so a small budget still holds a few).
PART_COST = 64


class Budget:
    """How much (in characters) a stream may still add to its assembled reply.

    Shared by every choice of one stream and charged for everything kept (text, logprobs,
    each new choice and tool call), so a reply longer than the store will keep can never
    grow the proxy's memory without bound; usage and finish reasons still arrive.
    """

    __slots__ = ("exhausted", "left", "parts_left")

    def __init__(self, chars: int | None) -> None:
        self.left = chars
        self.parts_left = None if chars is None else max(8, chars // PART_COST)
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

    def extend(self, target: list[str], values: list[Any]) -> None:
        """Keep a run's texts in `target` as `take` would each, charged at once if they fit."""
        size = sum(map(len, values))
        if self.left is None or size <= self.left:
            if self.left is not None:
                self.left -= size
            target.extend(values)
            return
        for value in values:
            if self.take(value):
                target.append(value)


class ToolCall:
    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: list[str] = []
        self.arguments: list[str] = []


class Choice:
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

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.role: str | None = None
        # Non-empty once any content delta came, even "": that is how None and "" differ.
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, ToolCall] = {}
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
        index = as_count(call.get("index"))
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
            state = self.tool_calls[index] = ToolCall()
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


def text_target(
    chunk: Any, states: Mapping[int, Choice], header_missing: tuple[str, ...]
) -> tuple[list[str], str, str] | None:
    """(list, text, key) when merging `chunk` would only add `text` to one choice's list.

    `key` is the delta field that carries it; `states`: the choices merged so far;
    `header_missing`: the header keys the reply still lacks (a chunk that brings one does
    more than add text).
    """
    if type(chunk) is not dict:
        return None
    choices = chunk.get("choices")
    if type(choices) is not list or len(choices) != 1 or chunk.get("error") is not None:
        return None
    if type(chunk.get("usage")) is dict:
        return None
    for key in header_missing:
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
    state = states.get(as_count(choice.get("index")) or 0)
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
        target = TEXT_FIELDS.get(key)
        if found is not None or target is None or not isinstance(value, str):
            return None
        found = (getattr(state, target), value, key)
    return found


def build_completion(
    header: Mapping[str, Any], choices: Mapping[int, Choice], usage: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The chat.completion object of a stream's header keys, choices and usage."""
    completion: dict[str, Any] = {
        "id": header.get("id"),
        "object": "chat.completion",
        "created": header.get("created"),
        "model": header.get("model"),
    }
    for key in ("system_fingerprint", "service_tier"):
        if key in header:
            completion[key] = header[key]
    completion["choices"] = [choice.build(index) for index, choice in sorted(choices.items())]
    if usage is not None:
        completion["usage"] = dict(usage)
    return completion
