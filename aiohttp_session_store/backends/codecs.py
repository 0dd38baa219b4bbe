"""Row codecs generated from the column lists: model values to parameters and back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Final, Generic, TypeVar

from ..models import LineageNode, RequestRecord, ResponseRecord, Session
from .columns import LINEAGE_COLUMNS, REQUEST_COLUMNS, RESPONSE_COLUMNS, SESSION_COLUMNS

__all__ = ("LINEAGE", "REQUESTS", "RESPONSES", "SESSIONS", "RowCodec")

T = TypeVar("T")

# Columns whose stored form differs from the field's: `stream` is INTEGER 0/1 on both
# databases, so both schemas stay column-for-column alike.
_DECODE: Final[dict[str, Callable[[Any], Any]]] = {"stream": bool}


@dataclass(frozen=True, slots=True)
class RowCodec(Generic[T]):
    """A model class and its columns; each column is the field of the same name."""

    cls: Callable[..., T]
    table: str
    columns: tuple[str, ...]
    # Every column's value in one C call: `args` runs for each record of every batch.
    _get: Callable[[T], tuple[object, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_get", attrgetter(*self.columns))

    @property
    def names(self) -> str:
        return ", ".join(self.columns)

    def prefixed(self, alias: str) -> str:
        return ", ".join(f"{alias}.{c}" for c in self.columns)

    def args(self, value: T, encode: Callable[[object], object]) -> tuple[object, ...]:
        # A bool is stored as 0/1 (see _DECODE); inline, as a call per value would cost more
        # than the rest of this.
        return tuple([encode(v) if type(v) is not bool else int(v) for v in self._get(value)])

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
