"""What differs between the SQL the two backends send: placeholders, collation, locking,
lists as parameters, limits, text encoding; one frozen object per database."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from ..models import storable

__all__ = ("POSTGRES", "SQLITE", "Binder", "Dialect")


def _pg_text(value: object) -> object:
    """Make a value storable: PostgreSQL TEXT cannot hold U+0000.

    Each NUL becomes the six characters `\\u0000`. In a JSON body a raw NUL can only stand
    inside a string (anywhere else the body was not JSON to begin with), where `\\u0000` is
    its escape, so a stored JSON body still parses to the same value. The price: a literal
    `\\u0000` and a raw NUL in non-JSON text read back the same. SQLite stores NUL as is.
    """
    value = storable(value)
    if type(value) is str and "\x00" in value:
        return value.replace("\x00", "\\u0000")
    return value


@dataclass(frozen=True, slots=True)
class Dialect:
    """The SQL spelling of one database; every query of the core is built from one."""

    #: The `Migration` field holding this dialect's DDL.
    name: Literal["sqlite", "postgres"]
    #: The placeholder of the n-th (1-based) parameter.
    placeholder: Callable[[int], str]
    #: Appended to a text column in ORDER BY so ties break by code point on both.
    collate: str
    #: The column that orders sessions created in the same millisecond by creation.
    creation_seq: str
    #: Appended to a SELECT choosing rows to delete, so concurrent sweeps split the work.
    skip_locked: str
    #: The LIMIT value meaning "no limit".
    unlimited: int | None
    #: `column IN <a list passed as one parameter>`, with `{col}` and `{ph}` to fill.
    any_of_sql: str
    #: How a list of text values is passed as that one parameter.
    list_param: Callable[[Sequence[str]], object]
    #: Makes a parameter value storable (lone surrogates, NUL on PostgreSQL).
    encode: Callable[[object], object]
    #: Whether a batch's session snapshots are written in id order: with row locks, one
    #: order for every instance means two batches cannot deadlock. SQLite (one writer at a
    #: time) keeps the batch's order instead, the creation order its rowids record.
    sorted_snapshots: bool
    #: The function giving the largest of its (non-NULL) arguments.
    greatest: str
    #: (table names) of the tables in the target (the file, or the schema in search_path).
    tables_sql: str
    #: The column of `search_docs` holding the request's `id` (migration 4).
    search_key: str
    #: `search_docs d` matching the query passed as `{ph}` (a `searchtext.fts5_query`).
    search_match: str
    #: The extract shown for a match of the query passed as `{ph}`.
    search_snippet: str

    def sql(self, template: str) -> str:
        """`template` with each `{}` replaced by the next placeholder, in order."""
        count = template.count("{}")
        return template.format(*(self.placeholder(i) for i in range(1, count + 1)))

    def values(self, count: int) -> str:
        return ", ".join(self.placeholder(i) for i in range(1, count + 1))

    def any_of(self, column: str, placeholder: str) -> str:
        return self.any_of_sql.format(col=column, ph=placeholder)


class Binder:
    """Collects the parameters of a dynamically built query and hands out placeholders."""

    __slots__ = ("_dialect", "params")

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self.params: list[object] = []

    def __call__(self, value: object) -> str:
        self.params.append(self._dialect.encode(value))
        return self._dialect.placeholder(len(self.params))


SQLITE: Final = Dialect(
    name="sqlite",
    placeholder=lambda _: "?",
    collate="",  # BINARY, SQLite's default, compares code points already
    # The rowid: an upsert keeps it, so it is the order the writer inserted sessions in.
    creation_seq="rowid",
    # One writer at a time holds the whole file: nothing to skip.
    skip_locked="",
    unlimited=-1,
    # json_each: a list of any length is one parameter, under every parameter limit.
    any_of_sql="{col} IN (SELECT value FROM json_each({ph}))",
    list_param=lambda values: json.dumps(list(values)),
    encode=storable,
    sorted_snapshots=False,
    greatest="max",
    tables_sql="SELECT name FROM sqlite_master WHERE type = 'table'"
    " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
    search_key="rowid",
    search_match="search_docs MATCH {ph}",
    search_snippet="snippet(search_docs, -1, '«', '»', '…', 16)",
)

POSTGRES: Final = Dialect(
    name="postgres",
    placeholder=lambda i: f"${i}",
    # The C collation breaks ties by code point, like SQLite's BINARY, whatever collation
    # the database was created with.
    collate=' COLLATE "C"',
    # Migration 2: PostgreSQL rows have no insertion order of their own.
    creation_seq="seq",
    skip_locked=" FOR UPDATE SKIP LOCKED",
    unlimited=None,  # LIMIT NULL
    any_of_sql="{col} = ANY({ph}::text[])",
    list_param=lambda values: [_pg_text(v) for v in values],
    encode=_pg_text,
    sorted_snapshots=True,
    greatest="GREATEST",
    # current_schema(): the first schema of search_path, the one every query resolves to.
    tables_sql="SELECT tablename FROM pg_tables WHERE schemaname = current_schema()",
    search_key="id",
    # websearch_to_tsquery never fails on its input; it is given the same quoted terms as
    # FTS5 ("a phrase" is a phrase, every term is required), so both find the same rows.
    search_match="d.document @@ websearch_to_tsquery('simple', {ph})",
    search_snippet="ts_headline('simple', d.prompt || ' ' || d.reply,"
    " websearch_to_tsquery('simple', {ph}),"
    " 'StartSel=«, StopSel=», MaxWords=24, MinWords=8')",
)
