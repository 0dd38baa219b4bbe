"""Terminal output for the CLI: safe text, tables, times, JSON; no command logic, no I/O of its own.

Records hold client text, so every string from a record passes `clean` before it reaches a
terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Final

from .timeparse import format_duration_ms

__all__ = (
    "MIN_CUT_WIDTH",
    "Progress",
    "clean",
    "opt",
    "relative",
    "short",
    "table",
    "terminal_width",
    "tokens",
    "write_json",
)

_BIDI_CONTROLS: Final = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def _char_table(*, keep_newlines: bool) -> dict[int, str]:
    """What `str.translate` makes of characters unsafe on a terminal.

    Records hold client text: an escape sequence must not reach the operator's terminal
    (C0 controls become their visible "control pictures", ␛ for ESC), and bidirectional
    overrides must not make a line read differently than it is.
    """
    table = {code: chr(0x2400 + code) for code in range(0x20)}
    table[0x7F] = "\u2421"
    table.update({code: "\ufffd" for code in range(0x80, 0xA0)})
    table.update({ord(ch): "\ufffd" for ch in _BIDI_CONTROLS})
    for ch in "\t\n\r\v\f\u2028\u2029":
        table[ord(ch)] = " "
    if keep_newlines:
        table.update({ord("\n"): "\n", ord("\t"): "\t", ord("\r"): "", 0x2028: "\n", 0x2029: "\n"})
    return table


_ONE_LINE: Final = _char_table(keep_newlines=False)
_MULTI_LINE: Final = _char_table(keep_newlines=True)


def clean(text: str, *, keep_newlines: bool = False) -> str:
    """`text` safe to print: controls made visible; one line unless `keep_newlines`."""
    if keep_newlines:
        return text.translate(_MULTI_LINE)
    return " ".join(text.translate(_ONE_LINE).split())


def short(text: str | None, width: int) -> str:
    """`text` cleaned and cut to `width` characters (an ellipsis marks the cut); "-" for None."""
    if text is None:
        return "-"
    line = clean(text)
    return line if len(line) <= width else line[: width - 1] + "…"


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: frozenset[int] = frozenset(),
    *,
    width: int | None = None,
    fit: frozenset[int] = frozenset(),
) -> list[str]:
    """Aligned columns, two spaces apart; the columns in `right` are right-aligned.

    With a `width`, lines longer than it are shortened by cutting the widest of the `fit`
    columns first (free text: messages, models), never below `MIN_CUT_WIDTH`; the other
    columns (ids, times, numbers) are never cut, so a table may still be wider.
    """
    widths = [max(len(r[i]) for r in (headers, *rows)) for i in range(len(headers))]
    if width is not None:
        widths = _fitted(widths, width, fit)
    lines = []
    for row in (headers, *rows):
        cells = [
            _cut(cell, widths[i]).rjust(widths[i])
            if i in right
            else _cut(cell, widths[i]).ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


#: The narrowest a column is cut to (an ellipsis included).
MIN_CUT_WIDTH: Final = 8


def _fitted(widths: list[int], width: int, fit: frozenset[int]) -> list[int]:
    widths = list(widths)
    excess = sum(widths) + 2 * (len(widths) - 1) - width
    while excess > 0:
        cuttable = [i for i in fit if widths[i] > MIN_CUT_WIDTH]
        if not cuttable:
            break
        widest = max(cuttable, key=lambda i: (widths[i], i))
        others = [widths[i] for i in cuttable if i != widest]
        # Down to the next widest (so the widest columns end level), at least by one.
        step = max(1, min(excess, widths[widest] - max([MIN_CUT_WIDTH, *others])))
        widths[widest] -= step
        excess -= step
    return widths


def _cut(cell: str, width: int) -> str:
    return cell if len(cell) <= width else cell[: width - 1] + "…"


def terminal_width(stream: IO[str]) -> int | None:
    """How wide tables written to `stream` may be: `COLUMNS` if set, else the terminal's
    width when `stream` is a terminal, else None (a pipe or a file: no limit)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isascii() and columns.isdecimal() and int(columns) > 0:
        return int(columns)
    if _isatty(stream):
        return shutil.get_terminal_size().columns
    return None


def relative(ms: int, now: int) -> str:
    """An expiry time said relative to `now`: "in 29m 57s" or "expired 3s ago"."""
    delta = ms - now
    if delta > 0:
        return "in " + format_duration_ms(delta)
    return "expired " + format_duration_ms(-delta) + " ago"


def opt(value: object) -> str:
    """`value` as text, "-" for None."""
    return "-" if value is None else str(value)


def tokens(prompt: int | None, completion: int | None, total: int | None) -> str:
    """Token counts as prompt/completion/total, "-" when the reply carried no usage."""
    if prompt is None and completion is None and total is None:
        return "-"
    return f"{opt(prompt)}/{opt(completion)}/{opt(total)}"


def write_json(out: IO[str], value: Any) -> None:
    """`value` as indented JSON, text kept as is (not \\u-escaped)."""
    out.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


class Progress:
    """A one-line progress indicator for a long command, redrawn in place on `stream`.

    Silent unless `stream` is a terminal, so logs and pipes get no carriage returns; redrawn
    at most every `interval` seconds of `clock`, so a fast loop does not flood the terminal.
    """

    def __init__(
        self,
        stream: IO[str],
        label: str,
        total: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.2,
    ) -> None:
        self.active = _isatty(stream)
        self._stream = stream
        self._label = label
        self._total = total
        self._clock = clock
        self._interval = interval
        self._drawn_at: float | None = None

    def update(self, done: int) -> None:
        """Show `done` (of the total, if known)."""
        text = f"{self._label} {done:,}"
        if self._total:
            text += f"/{self._total:,} ({min(100, done * 100 // self._total)}%)"
        self._draw(text)

    def show(self) -> None:
        """Show the label alone: work under way whose size is not known."""
        self._draw(f"{self._label}…")

    def _draw(self, text: str) -> None:
        if not self.active:
            return
        now = self._clock()
        if self._drawn_at is not None and now - self._drawn_at < self._interval:
            return
        self._drawn_at = now
        self._stream.write(f"\r{text}\x1b[K")
        self._stream.flush()

    def finish(self) -> None:
        """Erase the line (the command prints its own summary)."""
        if self.active and self._drawn_at is not None:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed, or not a real file
        return False
