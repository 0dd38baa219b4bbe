"""Row codecs generated from the column lists: model values to parameters and back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

from ..models import LineageNode, RequestRecord, ResponseRecord, Session
from .columns import LINEAGE_COLUMNS, REQUEST_COLUMNS, RESPONSE_COLUMNS, SESSION_COLUMNS

__all__ = ("LINEAGE", "REQUESTS", "RESPONSES", "SESSIONS", "RowCodec")

T = TypeVar("T")

# Columns whose stored form differs from the field's: `stream` is INTEGER 0/1 on both
# databases, so both schemas stay column-for-column alike.
_DECODE: Final[dict[str, Callable[[Any], Any]]] = {"stream": bool}


def _store(value: object, encode: Callable[[object], object]) -> object:
    if type(value) is bool:
        return 1 if value else 0
    return encode(value)


@dataclass(frozen=True, slots=True)
class RowCodec(Generic[T]):
    """A model class and its columns; each column is the field of the same name."""

    cls: Callable[..., T]
    table: str
    columns: tuple[str, ...]

    @property
    def names(self) -> str:
        return ", ".join(self.columns)

    def prefixed(self, alias: str) -> str:
        return ", ".join(f"{alias}.{c}" for c in self.columns)

    def args(self, value: T, encode: Callable[[object], object]) -> tuple[object, ...]:
        return tuple(_store(getattr(value, c), encode) for c in self.columns)

    def decode(self, row: Sequence[Any], start: int = 0, **extra: object) -> T:
        fields = {
            c: _DECODE[c](row[start + i]) if c in _DECODE else row[start + i]
            for i, c in enumerate(self.columns)
        }
        return self.cls(**fields, **extra)


SESSIONS: Final = RowCodec(Session, "sessions", SESSION_COLUMNS)
REQUESTS: Final = RowCodec(RequestRecord, "requests", REQUEST_COLUMNS)
RESPONSES: Final = RowCodec(ResponseRecord, "responses", RESPONSE_COLUMNS)
LINEAGE: Final = RowCodec(LineageNode, "lineage", LINEAGE_COLUMNS)
