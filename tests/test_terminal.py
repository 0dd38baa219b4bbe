"""terminal.py: tables fitted to a width, the width itself, and the progress line."""

from __future__ import annotations

import io

import pytest

from aiohttp_session_store.terminal import MIN_CUT_WIDTH, Progress, table, terminal_width

HEADERS = ["ID", "MODEL", "MESSAGE"]
ROWS = [
    ["a" * 32, "gpt-4o-2024-08-06", "Write a haiku about the sea, please, in English"],
    ["b" * 32, "qwen-max", "Hello world"],
]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_table_without_width_is_never_cut() -> None:
    lines = table(HEADERS, ROWS)
    assert ROWS[0][2] in lines[1]
    assert len(lines[1]) == 32 + 2 + 17 + 2 + 47


def test_table_cuts_the_widest_text_column_first() -> None:
    lines = table(HEADERS, ROWS, width=80, fit=frozenset({1, 2}))
    assert max(len(line) for line in lines) <= 80
    assert lines[1].startswith("a" * 32 + "  gpt-4o-2024-08-06  ")  # the model fits, uncut
    assert lines[1].endswith("…")
    assert lines[2].endswith("Hello world")


def test_table_cuts_both_to_a_level_then_never_below_the_minimum() -> None:
    lines = table(HEADERS, ROWS, width=60, fit=frozenset({1, 2}))
    assert max(len(line) for line in lines) <= 60
    model, message = lines[1][34:].split("  ", 1)
    assert abs(len(model) - len(message.rstrip())) <= 1  # cut to the same width
    # Too narrow: the ids are never cut, the text columns stop at the minimum.
    lines = table(HEADERS, ROWS, width=10, fit=frozenset({1, 2}))
    assert lines[1] == "a" * 32 + "  gpt-4o-…  Write a…"
    assert len("gpt-4o-…") == MIN_CUT_WIDTH


def test_table_leaves_columns_outside_fit_alone() -> None:
    lines = table(HEADERS, ROWS, width=40, fit=frozenset())
    assert lines == table(HEADERS, ROWS)


@pytest.mark.parametrize(
    ("columns", "tty", "expected"),
    [("100", False, 100), ("100", True, 100), ("", False, None), ("abc", False, None)],
)
def test_terminal_width(
    monkeypatch: pytest.MonkeyPatch, columns: str, tty: bool, expected: int | None
) -> None:
    monkeypatch.setenv("COLUMNS", columns)
    stream = Tty() if tty else io.StringIO()
    assert terminal_width(stream) == expected


def test_terminal_width_of_a_terminal_without_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr("shutil.get_terminal_size", lambda: __import__("os").terminal_size((91, 5)))
    assert terminal_width(Tty()) == 91


def test_progress_is_silent_when_not_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress(stream, "reading", 10)
    progress.update(5)
    progress.show()
    progress.finish()
    assert not progress.active
    assert stream.getvalue() == ""


def test_progress_redraws_at_most_every_interval() -> None:
    now = [0.0]
    stream = Tty()
    progress = Progress(stream, "reading", 1000, clock=lambda: now[0], interval=0.5)
    progress.update(1)
    progress.update(2)  # too soon: not drawn
    now[0] = 0.6
    progress.update(3)
    progress.finish()
    assert stream.getvalue() == ("\rreading 1/1,000 (0%)\x1b[K\rreading 3/1,000 (0%)\x1b[K\r\x1b[K")


def test_progress_without_a_total() -> None:
    stream = Tty()
    progress = Progress(stream, "sweeping")
    progress.show()
    assert stream.getvalue() == "\rsweeping…\x1b[K"
