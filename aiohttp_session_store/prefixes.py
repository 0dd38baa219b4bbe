"""Ids written short: the one rule by which the CLI and the query API expand an id prefix."""

from __future__ import annotations

from typing import Literal

from .backends.base import Backend
from .backends.reads import PREFIX_CANDIDATES

__all__ = ("AmbiguousIdError", "resolve_id")


class AmbiguousIdError(ValueError):
    """A prefix that starts more than one id; the message names them."""

    def __init__(self, kind: str, prefix: str, candidates: list[str]) -> None:
        self.candidates = candidates[:PREFIX_CANDIDATES]
        more = ", ..." if len(candidates) > PREFIX_CANDIDATES else ""
        super().__init__(
            f"{kind} id prefix {prefix!r} is ambiguous: it starts"
            f" {'more than ' if more else ''}{len(self.candidates)} ids"
            f" ({', '.join(self.candidates)}{more}); give more characters"
        )


async def resolve_id(backend: Backend, kind: Literal["session", "request"], given: str) -> str:
    """The full id `given` stands for.

    An id that exists as given is itself, even when it also starts longer ones (client
    chosen session ids may be prefixes of each other). Otherwise the one id it starts; none:
    `given` unchanged, so the caller reports it as unknown. More than one: AmbiguousIdError.
    """
    if not given:
        return given
    found = await backend.find_id_prefix(kind, given)
    if given in found or not found:
        return given
    if len(found) == 1:
        return found[0]
    raise AmbiguousIdError(kind, given, found)
