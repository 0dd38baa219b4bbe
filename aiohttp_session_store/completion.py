"""Reading a chat.completion JSON reply: `json_loads` parses one, `completion_summary`
takes the columns a response record keeps (token counts, finish_reason) off it. Pure (no I/O).

Shared by the non-streamed path (the middleware reads the reply's body) and the streamed one
(the assembler's rebuilt reply), so both record the same columns the same way.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ("CompletionSummary", "as_count", "completion_summary", "json_loads")

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


@dataclass(slots=True)
class CompletionSummary:
    """The columns a response record takes from a completion: token counts, finish_reason."""

    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    finish_reason: str | None


def as_count(value: object) -> int | None:
    """`value` if it is an int (a token count, an index), else None."""
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
        if as_count(choice.get("index")) == 0:
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
        prompt_tokens=as_count(usage.get("prompt_tokens")),
        completion_tokens=as_count(usage.get("completion_tokens")),
        total_tokens=as_count(usage.get("total_tokens")),
        finish_reason=finish_reason if isinstance(finish_reason, str) else None,
    )
