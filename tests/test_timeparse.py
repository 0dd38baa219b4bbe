"""timeparse.py: durations and instants as typed, and times as printed; no clock involved."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiohttp_session_store.timeparse import (
    MAX_DURATION_SECONDS,
    format_duration_ms,
    format_iso,
    format_local,
    parse_duration,
    parse_time,
)

NOW = 1_795_942_557_123  # 2026-11-29T08:55:57.123Z
UTC = timezone.utc
CET = timezone(timedelta(hours=1))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("30m", 1800),
        ("2h", 7200),
        ("7d", 604_800),
        ("1w", 604_800),
        ("1.5h", 5400),
        ("1h30m", 5400),
        ("1d12h", 129_600),
        (" 2h ", 7200),
        ("0.5s", 0.5),
        ("100000m", 6_000_000),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2",
        "h",
        "2H",
        "2M",
        "-2h",
        "+2h",
        "2 h",
        "2hours",
        "2h ago",
        "1e3s",
        "0s",
        "0h0m",
        ".5h",
        "2h-",
        "٣h",  # a non-ASCII digit
        "' OR 1=1 --",
        f"{MAX_DURATION_SECONDS + 1}s",
    ],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_parse_duration_refuses_non_strings() -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(7200)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2h", NOW - 7_200_000),
        ("7d", NOW - 7 * 86_400_000),
        ("45s", NOW - 45_000),
        ("1.5s", NOW - 1500),
        ("now", NOW),
        ("2026-11-24", 1_795_478_400_000),
        ("2026-11-24T08:55", 1_795_510_500_000),
        ("2026-11-24 08:55:57", 1_795_510_557_000),
        ("2026-11-24T08:55:57.123Z", 1_795_510_557_123),
        ("2026-11-24T08:55:57.1Z", 1_795_510_557_100),
        ("2026-11-24T08:55:57.123456Z", 1_795_510_557_123),
        ("2026-11-24T09:55:57.123+01:00", 1_795_510_557_123),
        ("2026-11-24T03:25:57.123-0530", 1_795_510_557_123),
        ("1970-01-01T00:00:00Z", 0),
        ("1969-12-31T23:59:59.999Z", -1),
    ],
)
def test_parse_time_in_utc(text: str, expected: int) -> None:
    assert parse_time(text, now=NOW, tz=UTC) == expected


def test_naive_times_are_read_in_the_given_zone_and_offsets_win() -> None:
    assert parse_time("2026-11-24T09:55", now=NOW, tz=CET) == parse_time(
        "2026-11-24T08:55Z", now=NOW, tz=CET
    )
    assert parse_time("2026-11-24", now=NOW, tz=CET) == 1_795_478_400_000 - 3_600_000
    # An explicit offset ignores tz.
    assert parse_time("2026-11-24T08:55Z", now=NOW, tz=CET) == 1_795_510_500_000


@pytest.fixture
def kolkata(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone set to UTC+05:30 (no DST) for one test."""
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is POSIX-only")
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("kolkata")
def test_naive_times_default_to_local_time() -> None:
    assert datetime(2026, 11, 24, 8, 55).astimezone().utcoffset() == timedelta(hours=5.5)
    assert parse_time("2026-11-24T08:55", now=NOW) == parse_time("2026-11-24T03:25Z", now=NOW)
    assert parse_time("2026-11-24T08:55Z", now=NOW) == 1_795_510_500_000
    assert format_local(1_795_510_500_000) == "2026-11-24 14:25:00"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2026-11-24T",
        "2026-11-24T8:55",
        "2026-13-01",
        "2026-02-30",
        "2026-11-24T24:00",
        "2026-11-24T08:60",
        "2026-11-24T08:55:61",
        "2026-11-24T08:55+25:00",
        "2026-11-24Z",
        "24/11/2026",
        "1795510557123",
        "2026-11-24T08:55:57.1234567Z",
        "2026-11-24'; DROP TABLE requests; --",
        "-2h",
        "٢٠٢٦-11-24",  # non-ASCII digits
    ],
)
def test_parse_time_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        parse_time(text, now=NOW, tz=UTC)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1_795_510_557_123, "2026-11-24T08:55:57.123Z"),
        (1_795_510_557_007, "2026-11-24T08:55:57.007Z"),
        (1_795_510_557_000, "2026-11-24T08:55:57.000Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
    ],
)
def test_format_iso(ms: int, text: str) -> None:
    assert format_iso(ms) == text


@given(st.integers(min_value=-(10**12), max_value=10**14))
def test_format_iso_round_trips(ms: int) -> None:
    assert parse_time(format_iso(ms), now=NOW) == ms


def test_format_local() -> None:
    assert format_local(1_795_510_557_999, UTC) == "2026-11-24 08:55:57"
    assert format_local(1_795_510_557_123, CET) == "2026-11-24 09:55:57"
    # What the CLI prints is what --since reads back, to the second.
    printed = format_local(1_795_510_557_123)
    assert parse_time(printed, now=NOW) == 1_795_510_557_000


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (None, "-"),
        (0, "0ms"),
        (850, "850ms"),
        (1_234, "1.2s"),
        (9_949, "9.9s"),
        (9_950, "10s"),
        (42_000, "42s"),
        (59_600, "1m"),
        (185_000, "3m 05s"),
        (3_600_000, "1h"),
        (7_800_000, "2h 10m"),
        (30 * 86_400_000, "30d"),
        (3 * 86_400_000 + 4 * 3_600_000 + 59_000, "3d 4h"),
        (-185_000, "-3m 05s"),
    ],
)
def test_format_duration_ms(ms: int | None, text: str) -> None:
    assert format_duration_ms(ms) == text
