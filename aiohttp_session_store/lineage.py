"""Conversation lineage: content-addressed chain hashes of a chat's messages (pure, no I/O).

The identity of a point in a conversation is the hash of everything before it, scoped by
the caller, as simonw/llm chains its conversations::

    h0 = SHA-256("aiohttp_session_store/lineage/v1" NUL scope)
    hk = SHA-256(h(k-1) || canonical(mk))          (digests chained as raw bytes)

`canonical(m)` keeps what defines the conversation and drops what clients commonly drop
or rewrite when they resend a history, so the history a client resends hashes the same
as the exchange the store recorded:

- kept: `role`; `name`; the text content (a string, or the `text` of its text parts
  joined with "\\n"), with whitespace at both ends removed; tool calls as
  (`id`, function `name`, `arguments`) in order; `tool_call_id`;
- dropped: reasoning fields (`reasoning_content`, `reasoning`, `thinking`), `refusal`,
  `annotations`, `audio`, nulls, empty strings and lists, and any key not listed above.

The scope is the empty string for a caller without a credential, else a digest of the
credential (see `scope_digest`), so two callers never share a node.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import importlib
import json
from collections.abc import Callable, Mapping, Sequence
from json.encoder import encode_basestring
from typing import Any, Final

from .hashing import content_text
from .session_cache import str_bytes

__all__ = (
    "LINEAGE_VERSION",
    "ChainLinks",
    "canonical",
    "chain_hashes",
    "extend",
    "reply_message",
    "root",
    "scope_digest",
)

LINEAGE_VERSION: Final = "aiohttp_session_store/lineage/v1"

_ROOT_PREFIX: Final = LINEAGE_VERSION.encode() + b"\x00"
_dumps: Final = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, check_circular=False
).encode

_fast_dumps: Callable[..., bytes] | None
try:  # the "speed" extra: the same bytes (compact, sorted keys, UTF-8), several times faster
    _orjson = importlib.import_module("orjson")
    _SORTED: Final = _orjson.OPT_SORT_KEYS
    _fast_dumps = _orjson.dumps
except ImportError:  # pragma: no cover - depends on the environment
    _fast_dumps = None


def _canonical_bytes(kept: dict[str, Any]) -> bytes:
    """`kept` as JSON bytes, exactly as the stdlib encoder spells them (hashes depend on it).

    orjson writes the same bytes for these values (str keys, str and list values); what it
    refuses (a lone surrogate, which it cannot encode) goes to the stdlib.
    """
    if _fast_dumps is not None:
        try:
            return _fast_dumps(kept, option=_SORTED)
        except TypeError:
            pass
    return _dumps(kept).encode("utf-8", "surrogatepass")


# Not cached, though every call asks: a cache keyed by credentials would keep a thousand
# callers' raw API keys alive in the process long after their requests, for one SHA-256.
def scope_digest(credential: str, key: bytes | None = None) -> str:
    """The scope of a caller: SHA-256 of the credential (HMAC-SHA-256 under `key` if given).

    The same digest keys derived session ids (see `hashing.scoped_session_id`), so the
    credential itself is never stored. A secret `key` makes the digest of a low-entropy
    credential useless to whoever reads the database.
    """
    raw = credential.encode("utf-8", "surrogatepass")
    if key is not None:
        return hmac.new(key, raw, hashlib.sha256).hexdigest()
    return hashlib.sha256(raw).hexdigest()


def _tool_calls(value: object) -> list[list[str]] | None:
    if not isinstance(value, list):
        return None
    calls: list[list[str]] = []
    for call in value:
        if not isinstance(call, Mapping):
            continue
        function = call.get("function")
        function = function if isinstance(function, Mapping) else {}
        calls.append(
            [
                _str(call.get("id")),
                _str(function.get("name")),
                _str(function.get("arguments")),
            ]
        )
    return calls or None


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""


# The stdlib encoder's own string encoder (ensure_ascii=False): the same bytes it writes.
_quote: Final[Callable[[str], str]] = encode_basestring


def _plain(role: str, content: str) -> bytes:
    """canonical() of {"role": role, "content": content}, spelt out: the same bytes as the
    encoder's (sorted keys, compact), at a fraction of the cost of a dict and a dumps."""
    stripped = content.strip()
    if stripped:
        text = f'{{"content":{_quote(stripped)},"role":{_quote(role)}}}'
    else:
        text = f'{{"role":{_quote(role)}}}'
    return text.encode("utf-8", "surrogatepass")


def canonical(message: object) -> bytes | None:
    """The bytes of `message` that its chain hash covers; None if it is not a message."""
    if type(message) is dict and len(message) == 2:
        # The commonest message, {"role", "content": str}: the same bytes, fewer lookups.
        role = message.get("role")
        content = message.get("content")
        if type(role) is str and role and type(content) is str:
            return _plain(role, content)
    if not isinstance(message, Mapping):
        return None
    role = message.get("role")
    if not isinstance(role, str) or not role:
        return None
    kept: dict[str, Any] = {"role": role}
    name = message.get("name")
    if isinstance(name, str) and name:
        kept["name"] = name
    text = content_text(message.get("content"))
    if text:
        text = text.strip()
        if text:
            kept["content"] = text
    calls = _tool_calls(message.get("tool_calls"))
    if calls:
        kept["tool_calls"] = calls
    call_id = message.get("tool_call_id")
    if isinstance(call_id, str) and call_id:
        kept["tool_call_id"] = call_id
    return _canonical_bytes(kept)


@functools.lru_cache(maxsize=1024)
def root(scope: str) -> bytes:
    """h0: the digest every chain of `scope` starts from."""
    return hashlib.sha256(_ROOT_PREFIX + scope.encode("utf-8", "surrogatepass")).digest()


def extend(previous: bytes, message: object) -> bytes | None:
    """h(k) from h(k-1) and the k-th message; None if `message` is not a message."""
    data = canonical(message)
    if data is None:
        return None
    return hashlib.sha256(previous + data).digest()


def chain_hashes(messages: Sequence[object], scope: str) -> list[bytes] | None:
    """[h1, ..., hn] for `messages`; None when one of them is not a message."""
    digest = root(scope)
    chain: list[bytes] = []
    sha256 = hashlib.sha256
    for message in messages:
        data = canonical(message)
        if data is None:
            return None
        digest = sha256(digest + data).digest()
        chain.append(digest)
    return chain


# What one remembered link holds beyond its text: key tuple, digests, dict slot.
_LINK_OVERHEAD: Final = 320


_CHAT_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class ChainLinks:
    """Chain links already computed, h(k-1) and a plain message -> h(k); bounded in bytes.

    A client resends its whole history every turn, so each message would otherwise be
    canonicalised and hashed again on every later turn of its conversation (quadratic in
    its length). A link is looked up by its text's own str hash, a small fraction of
    canonicalising and SHA-256-ing it; the digest is the one `extend` gives. Only plain
    messages ({"role", "content": str}, nearly all of them) are remembered; the oldest
    links are forgotten first once past `max_bytes`.
    """

    __slots__ = ("_links", "bytes", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self._links: dict[tuple[bytes, str, str], tuple[bytes, int]] = {}
        self.bytes = 0
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self._links)

    def _plain_link(self, previous: bytes, role: str, content: str) -> bytes:
        key = (previous, role, content)
        found = self._links.get(key)
        if found is not None:
            return found[0]
        digest = hashlib.sha256(previous + _plain(role, content)).digest()
        size = _LINK_OVERHEAD + str_bytes(role) + str_bytes(content)
        if size <= self.max_bytes:
            links = self._links
            links[key] = (digest, size)
            self.bytes += size
            while self.bytes > self.max_bytes:
                self.bytes -= links.pop(next(iter(links)))[1]
        return digest

    def extend(self, previous: bytes, message: object) -> bytes | None:
        """`extend(previous, message)`, remembered."""
        if type(message) is dict and len(message) == 2:
            role = message.get("role")
            content = message.get("content")
            # Only the roles of the chat format: any other role string (a client's, of any
            # size) is hashed without being remembered.
            if type(role) is str and role in _CHAT_ROLES and type(content) is str:
                return self._plain_link(previous, role, content)
        return extend(previous, message)

    def chain(self, messages: Sequence[object], scope: str) -> list[bytes] | None:
        """`chain_hashes(messages, scope)`, each link remembered."""
        digest = root(scope)
        chain: list[bytes] = []
        for message in messages:
            next_digest = self.extend(digest, message)
            if next_digest is None:
                return None
            chain.append(next_digest)
            digest = next_digest
        return chain

    def clear(self) -> None:
        self._links.clear()
        self.bytes = 0


def reply_message(reply: object) -> dict[str, Any] | None:
    """The assistant message of a `chat.completion` object (choice 0), as a client resends it."""
    if not isinstance(reply, dict) and not isinstance(reply, Mapping):
        return None
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    first = choices[0]
    if not isinstance(first, dict) and not isinstance(first, Mapping):
        return None
    message = first.get("message")
    if not isinstance(message, dict) and not isinstance(message, Mapping):
        return None
    out: dict[str, Any] = {"role": message.get("role") or "assistant"}
    for key in ("content", "tool_calls", "name"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out
