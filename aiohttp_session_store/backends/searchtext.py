"""What the search index holds and how a person's query becomes a safe full-text query.

Pure (no I/O): the writer's batches, the migration that indexes existing rows and the
search itself all take their text from here, so an exchange is indexed the same way
whichever path wrote it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from ..hashing import content_text
from ..models import Exchange

__all__ = (
    "MAX_INDEXED_CHARS",
    "SNIPPET_CLOSE",
    "SNIPPET_OPEN",
    "SearchHit",
    "fts5_query",
    "prompt_text",
    "reply_text",
    "search_terms",
)

#: Text indexed per exchange side: bodies may be 1 MiB; the index stays bounded per row and
#: the start of a message is what people search for.
MAX_INDEXED_CHARS: Final = 32_768
#: What surrounds a matched word in a snippet (plain text; a page escapes it then styles it).
SNIPPET_OPEN: Final = "«"
SNIPPET_CLOSE: Final = "»"

# A word: a run of letters/digits (what both full-text tokenizers keep), or a quoted phrase.
_TERM: Final = re.compile(r'"([^"]*)"|([^\s"]+)')
_WORD: Final = re.compile(r"\w", re.UNICODE)
_MAX_TERMS: Final = 32


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One exchange that matched, with a short extract around the match."""

    exchange: Exchange
    snippet: str


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _cut(parts: list[str]) -> str:
    return "\n".join(p for p in parts if p)[:MAX_INDEXED_CHARS]


def prompt_text(openai_request: str | None) -> str:
    """The text a request adds to its conversation: its messages after the last assistant
    message (the user, tool and, on a first turn, system messages).

    Clients resend the whole history every turn; indexing only what is new keeps each
    message in the index about once per conversation instead of once per later turn.
    """
    body = _loads(openai_request)
    messages = body.get("messages") if isinstance(body, Mapping) else None
    if not isinstance(messages, list):
        return ""
    start = 0
    for i, message in enumerate(messages):
        if isinstance(message, Mapping) and message.get("role") == "assistant":
            start = i + 1
    texts = []
    for message in messages[start:]:
        if isinstance(message, Mapping):
            texts.append(content_text(message.get("content")) or "")
    return _cut(texts)


def reply_text(openai_response: str | None, error: str | None) -> str:
    """The reply's text (each choice's content; a stream's is stored assembled), an error
    body's message, and the response's `error`."""
    body = _loads(openai_response)
    texts: list[str] = []
    if isinstance(body, Mapping):
        failure = body.get("error")
        if isinstance(failure, Mapping) and isinstance(failure.get("message"), str):
            texts.append(failure["message"])
        choices = body.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            message = choice.get("message") if isinstance(choice, Mapping) else None
            if isinstance(message, Mapping):
                texts.append(content_text(message.get("content")) or "")
    if error:
        texts.append(error)
    return _cut(texts)


def search_terms(query: str) -> list[str]:
    """The words and "quoted phrases" of a person's query, as plain text.

    Raises ValueError when nothing searchable is left (empty, or only punctuation).
    """
    terms = []
    for phrase, word in _TERM.findall(query):
        term = " ".join((phrase or word).split())
        if _WORD.search(term):
            terms.append(term)
    if not terms:
        raise ValueError(f"the search query {query!r} has no words to search for")
    if len(terms) > _MAX_TERMS:
        raise ValueError(f"the search query has {len(terms)} terms; at most {_MAX_TERMS}")
    return terms


def fts5_query(query: str) -> str:
    """An FTS5 MATCH expression finding rows holding every term of `query`.

    Each term becomes a string in double quotes (inner quotes doubled), which FTS5 reads as
    a phrase of plain tokens: `NEAR(`, `OR`, `*`, `col:` and stray quotes are text, never
    syntax.
    """
    return " ".join('"' + term.replace('"', '""') + '"' for term in search_terms(query))
