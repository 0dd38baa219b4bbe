"""Session ids: derived from the first user message, or validated when a client chooses one."""

from __future__ import annotations

import functools
import hashlib
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from .errors import InvalidSessionIdError

__all__ = (
    "MAX_SESSION_ID_LENGTH",
    "content_text",
    "first_user_text",
    "generate_session_id",
    "scoped_session_id",
    "validate_session_id",
)

MAX_SESSION_ID_LENGTH: Final = 128
_SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_md5: Callable[[bytes], Any]
try:  # CPython's own MD5: no OpenSSL algorithm fetch per call, a third of the cost
    _md5 = importlib.import_module("_md5").md5
except ImportError:  # pragma: no cover - depends on the interpreter
    _md5 = functools.partial(hashlib.md5, usedforsecurity=False)


def generate_session_id(text: object) -> str:
    """Lowercase hex MD5 of the UTF-8 bytes of `text`, unchanged (no trimming).

    MD5 is the origin project's choice and is kept for compatibility of ids, not for
    security: see `scoped_session_id` for ids that clients cannot collide on.
    """
    if not isinstance(text, str):
        raise InvalidSessionIdError(
            f"a session id is derived from a string, not {type(text).__name__}"
        )
    if not text:
        raise InvalidSessionIdError("a session id cannot be derived from an empty message")
    # surrogatepass: a lone surrogate (from JSON "\ud800") still hashes instead of crashing.
    digest: str = _md5(text.encode("utf-8", "surrogatepass")).hexdigest()
    return digest


def scoped_session_id(credential: str, text: str) -> str:
    """An id derived per credential: MD5 of `sha256(credential)` hex, a NUL, then `text`.

    The credential itself never reaches the id (only its digest does), and two credentials
    sending the same first words get different ids.
    """
    if not text:
        raise InvalidSessionIdError("a session id cannot be derived from an empty message")
    digest = hashlib.sha256(credential.encode("utf-8", "surrogatepass")).hexdigest()
    return generate_session_id(f"{digest}\x00{text}")


def validate_session_id(value: str) -> str:
    """Return a client-chosen id unchanged if it is 1-128 characters of `[A-Za-z0-9._:-]`."""
    if not _SESSION_ID_RE.fullmatch(value):
        raise InvalidSessionIdError(
            "a session id must be 1 to 128 characters of letters, digits and . _ : -"
        )
    return value


def content_text(content: Any) -> str | None:
    """A message's text: string content as is, or its text parts joined with "\\n"."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, Mapping)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts) if texts else None
    return None


def first_user_text(body: Any) -> str | None:
    """The text of the first `role == "user"` message of a chat request body, if any.

    String content is taken as is; a list of parts gives the `text` of its text parts joined
    with "\\n". Anything malformed gives None rather than an error: a request we cannot key
    still gets served and recorded, just without a session.
    """
    if not isinstance(body, Mapping):
        return None
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    for message in messages:
        if isinstance(message, Mapping) and message.get("role") == "user":
            text = content_text(message.get("content"))
            return text or None
    return None
