"""Times as people type and read them: `2h`, `7d`, ISO dates in; milliseconds since the epoch out.

Pure: the current time and the time zone for dates written without one are arguments, so
every function here is deterministic and tested without a clock.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Final

__all__ = (
    "MAX_DURATION_SECONDS",
    "format_duration_ms",
    "format_iso",
    "format_local",
    "parse_duration",
    "parse_time",
)

_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_PART_RE: Final = re.compile(r"(\d+(?:\.\d+)?)([smhdw])", re.ASCII)
# re.ASCII: \d would otherwise match any script's digits, which float() and int() accept.
_DURATION_RE: Final = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+", re.ASCII)

# Larger values are typos, and their milliseconds would overflow a 64-bit column.
MAX_DURATION_SECONDS: Final = 100 * 366 * 86_400

# Spelled out rather than left to datetime.fromisoformat, whose accepted forms differ
# between Python 3.10 and 3.11 (3.10 has no "Z", no 1-2 digit fractions).
_ISO_RE: Final = re.compile(
    r"(?P<y>\d{4})-(?P<mo>\d{2})-(?P<d>\d{2})"
    r"(?:[T ](?P<h>\d{2}):(?P<mi>\d{2})(?::(?P<s>\d{2})(?:\.(?P<f>\d{1,6}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?)?",
    re.ASCII,
)

_TIME_HELP: Final = (
    "use a duration ago such as 30m, 2h, 7d, 1w, or a date or time such as"
    " 2026-11-24, 2026-11-24T08:00 or 2026-11-24T08:00:00Z"
)

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=timezone.utc)


def parse_duration(text: str) -> float:
    """Seconds in a duration such as `45s`, `30m`, `2h`, `7d`, `1w`, `1.5h` or `1h30m`.

    Units are lowercase (an `M` could mean months). Zero, negative and implausibly long
    (over 100 years) durations are refused with ValueError.
    """
    if not isinstance(text, str) or not _DURATION_RE.fullmatch(text.strip()):
        raise ValueError(
            f"invalid duration {text!r}: a number and a unit (s, m, h, d, w), e.g. 45s, 30m,"
            " 2h, 7d, 1w or 1h30m"
        )
    seconds = sum(
        float(number) * _UNIT_SECONDS[unit] for number, unit in _PART_RE.findall(text.strip())
    )
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be greater than zero")
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"invalid duration {text!r}: longer than 100 years")
    return seconds


def _offset(text: str) -> timezone:
    if text == "Z":
        return timezone.utc
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:])
    if hours > 23 or minutes > 59:
        raise ValueError(f"invalid UTC offset {text!r}")
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def _to_ms(moment: datetime) -> int:
    # Exact integer arithmetic: timestamp() goes through a float and can be 1 ms off.
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def parse_time(text: str, *, now: int, tz: tzinfo | None = None) -> int:
    """Milliseconds since the epoch for `text`.

    `text` is a duration, meaning that long before `now` (`2h` is two hours ago), `now`
    itself, or an ISO 8601 date or date-time. A date alone is midnight. A date-time with
    `Z` or an offset is exact; without one it is read in `tz`, or in the system's local
    time zone when `tz` is None (the CLI prints local times, so that is what users copy).
    """
    if not isinstance(text, str):
        raise ValueError(f"invalid time {text!r}: {_TIME_HELP}")
    stripped = text.strip()
    if stripped == "now":
        return now
    if _DURATION_RE.fullmatch(stripped):
        return now - round(parse_duration(stripped) * 1000)
    match = _ISO_RE.fullmatch(stripped)
    if match is None:
        raise ValueError(f"invalid time {text!r}: {_TIME_HELP}")
    parts = match.groupdict()
    try:
        naive = datetime(
            int(parts["y"]),
            int(parts["mo"]),
            int(parts["d"]),
            int(parts["h"] or 0),
            int(parts["mi"] or 0),
            int(parts["s"] or 0),
            int((parts["f"] or "0").ljust(6, "0")),
        )
        zone = _offset(parts["tz"]) if parts["tz"] else tz
        if zone is None:
            # astimezone() on a naive value reads it as system local time.
            moment = naive.astimezone()
        else:
            moment = naive.replace(tzinfo=zone)
            # A named zone (zoneinfo) resolves its offset on the wall time given.
            moment = moment.astimezone(timezone.utc)
        return _to_ms(moment)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"invalid time {text!r}: {exc}") from None


def format_iso(ms: int) -> str:
    """`2026-11-24T08:55:57.123Z`: UTC, always with milliseconds (the `--json` form)."""
    moment = _EPOCH + timedelta(milliseconds=ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_local(ms: int, tz: tzinfo | None = None) -> str:
    """`2026-11-24 09:55:57` in `tz` (system local time when None), for human output."""
    moment = (_EPOCH + timedelta(milliseconds=ms)).astimezone(tz)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def format_duration_ms(ms: int | None) -> str:
    """A short human duration: `850ms`, `1.2s`, `42s`, `3m 05s`, `2h`, `3d 4h`; `-` for None.

    Two units at most, the smaller one left out when it is zero.
    """
    if ms is None:
        return "-"
    if ms < 0:
        return "-" + format_duration_ms(-ms)
    if ms < 1000:
        return f"{ms}ms"
    if ms < 9_950:  # from here on "{:.1f}" would round up to "10.0s"
        return f"{ms / 1000:.1f}s"
    seconds = round(ms / 1000)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s" if seconds else f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"
