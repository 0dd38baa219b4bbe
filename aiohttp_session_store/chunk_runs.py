"""Finding, in the raw data of a stream's events, the chunks that repeat a known one but for
one string.

A chat stream is mostly chunks that differ from each other only in one JSON string (the next
piece of content): same id, model, index and nulls around it. Once one such chunk has been
parsed and merged, the bytes before and after that string (`prefix`, `suffix`) identify
the others, and a whole run of them is decoded by one `orjson.loads` of their strings joined
into an array: no dict per chunk, no Python work per chunk. Pure (no I/O).

Exactness: a chunk counts as a repeat only if it is `prefix + token + suffix` with `token`
one JSON string (checked on the run's bytes: quotes only around each token, none escaped
into or out of one). It then tokenizes as the known chunk does, so it parses to the same
object with that string's value, and merging it has the same effect; the caller checks
that the string's place is the one that carries the text (`probe`). Anything else, or any
doubt (bytes orjson refuses), is left to the caller's chunk-by-chunk path.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from itertools import accumulate
from operator import add, itemgetter
from typing import Any, Final

from .completion import json_loads

__all__ = ("loads", "probe", "run_values", "template", "token_span")

loads: Callable[[bytes], Any]
try:
    import orjson

    loads = orjson.loads
    _dumps: Callable[[str], bytes] | None = orjson.dumps
except ImportError:  # pragma: no cover - depends on the environment
    loads = json.loads
    _dumps = None

# Stands for a boundary between two tokens of a run while they are checked; a raw one in a
# token (never in valid JSON) makes the run refused.
_SEP: Final = b"\x04"


def token_span(payload: bytes, value: str) -> tuple[bytes, bytes] | None:
    """(prefix, suffix) around the last place `value` is written as a JSON string in `payload`."""
    try:
        token = _dumps(value) if _dumps is not None else json.dumps(value).encode()
    except TypeError:  # a lone surrogate: orjson refuses it
        token = b""
    at = payload.rfind(token) if token else -1
    if at < 0:  # written another way (\\u escapes, say)
        token = json.dumps(value).encode()
        at = payload.rfind(token)
    if at < 1:
        return None
    prefix, suffix = payload[:at], payload[at + len(token) :]
    if not suffix or prefix.find(b"\n") >= 0 or suffix.find(b"\n") >= 0:
        return None
    return prefix, suffix


def probe(prefix: bytes, suffix: bytes, value: str) -> tuple[bytes, str]:
    """A chunk like the known one with another string in its place, and that string."""
    other = "@@" if value == "@" else "@"
    return prefix + b'"' + other.encode() + b'"' + suffix, other


def template(payload: bytes, text: str, key: str) -> tuple[bytes, bytes] | None:
    """(prefix, suffix) around `text` in `payload`, a chunk whose choice 0 carries it in
    `delta[key]`; None if the string found there may not be that one."""
    span = token_span(payload, text)
    if span is None:
        return None
    prefix, suffix = span
    # The string found must be the one that carries the text, not an equal one beside
    # it: written another way, it changes the text and nothing else.
    other, value = probe(prefix, suffix, text)
    try:
        probed = json_loads(other)["choices"][0]["delta"][key]
    except (ValueError, RecursionError, LookupError, TypeError):
        return None
    return span if probed == value else None


def run_values(
    payloads: list[bytes], start: int, prefix: bytes, suffix: bytes, joined: bytes, at: int
) -> tuple[list[Any], int] | None:
    """The strings of the repeats from `payloads[start]` on, in order, and where the line
    after them starts in `joined`.

    `joined` is `b"\\n".join(payloads)` (which hold no line break); `payloads[start]`
    starts at `at` in it. None when `payloads[start]` does not look like a repeat; ([], at)
    when it does but the run's bytes are refused (go chunk by chunk; do not try them again).
    """
    first = payloads[start]
    lp, ls = len(prefix), len(suffix)
    if len(first) < lp + ls + 2 or first[:lp] != prefix or first[-ls:] != suffix:
        return None
    rest = payloads[start:] if start else payloads
    # The run most likely ends with the last line that starts like a repeat (found
    # backwards: a long needle costs little that way), or the line before it.
    last = joined.rfind(b"\n" + prefix, at)
    end = at + len(first) if last < 0 else joined.find(b"\n", last + 1)
    if end < 0:
        end = len(joined)
    count, after = len(rest), len(joined) - end
    while after > 0:
        count -= 1
        after -= len(rest[count]) + 1
    # What each line would hold if it were a repeat; the lines that are, rebuilt from
    # those tokens, are the same bytes (C copies and compares, no Python work per line).
    tokens = list(map(itemgetter(slice(lp, -ls)), rest[:count] if count < len(rest) else rest))
    glue = suffix + b"\n" + prefix
    if not _same(joined, at, end, tokens, count, glue, suffix):
        end -= len(rest[count - 1]) + 1
        count -= 1
        if not _same(joined, at, end, tokens, count, glue, suffix):
            ends = list(map(add, accumulate(map(len, rest), initial=at), itertools.count(-1)))
            low, high = 1, count - 1  # the first line is a repeat; find how many follow it
            while low < high:
                mid = (low + high + 1) // 2
                if _same(joined, at, ends[mid], tokens, mid, glue, suffix):
                    low = mid
                else:
                    high = mid - 1
            count = low
            end = ends[count]
        del tokens[count:]
    # Each token one JSON string: with escaped backslashes and quotes gone, the only quotes
    # left are the two around each token.
    bare = _SEP.join(tokens)
    if bare.count(_SEP) != count - 1:
        return [], at
    bare = bare.replace(b"\\\\", b"").replace(b'\\"', b"").replace(b'"\x04"', _SEP)
    if bare[:1] != b'"' or bare[-1:] != b'"' or bare.count(b'"') != 2:
        return [], at
    try:
        values: list[Any] = loads(b"[" + b",".join(tokens) + b"]")
    except ValueError:  # control characters, bad escapes or UTF-8, lone surrogates
        return [], at
    return (values, end + 1) if len(values) == count else ([], at)


def _same(
    joined: bytes, at: int, end: int, tokens: list[bytes], count: int, glue: bytes, suffix: bytes
) -> bool:
    """Are the lines of `joined` from `at` to `end` the first `count` tokens' repeats?

    The first line is known to be one; `glue` ends with the prefix.
    """
    if count < 2:
        return count == 1
    ls = len(suffix)
    return joined[end - ls : end] == suffix and joined[at + len(glue) - ls - 1 : end - ls] == (
        glue.join(tokens[:count] if count < len(tokens) else tokens)
    )
