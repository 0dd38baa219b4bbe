"""Summarise a py-spy `--format raw` profile (collapsed stacks): the hottest functions, as text.

    python benchmarks/profile_summary.py /tmp/profile.txt [--top 30] [--match aiohttp_session_store]

Prints, per function, its inclusive share (samples with it anywhere on the stack) and its self
share (samples with it on top), so a hot spot in the package is found without a browser.
`--match` limits the listing to frames whose file contains the string; shares stay relative to
every sample of the process.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

__all__ = ("Summary", "main", "summarize")

# A py-spy frame: "function (path/to/file.py:123)"; the line number is dropped so one
# function's samples add up.
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")


class Summary:
    def __init__(self) -> None:
        self.total = 0
        self.inclusive: Counter[str] = Counter()
        self.self_time: Counter[str] = Counter()
        self.files: Counter[str] = Counter()


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.", "/work/main/"):
        idx = path.find(marker)
        if idx >= 0:
            rest = path[idx + len(marker) :]
            return rest.split("/", 1)[1] if marker == "lib/python3." else rest
    return path


def _frame_key(frame: str, lines: bool) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip(), ""
    file = _short(m.group("file"))
    where = f"{file}:{m.group('line')}" if lines and m.group("line") else file
    return f"{m.group('func')} ({where})", file


def summarize(lines: list[str], *, by_line: bool = False) -> Summary:
    summary = Summary()
    for line in lines:
        line = line.rstrip()
        if not line:
            continue
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = [_frame_key(f, by_line) for f in stack.split(";") if f]
        if not frames:
            continue
        summary.total += count
        seen: set[str] = set()
        seen_files: set[str] = set()
        for key, file in frames:
            if key not in seen:
                summary.inclusive[key] += count
                seen.add(key)
            if file and file not in seen_files:
                summary.files[file] += count
                seen_files.add(file)
        summary.self_time[frames[-1][0]] += count
    return summary


def _print_table(
    title: str, rows: list[tuple[str, int]], total: int, us_per_sample: float | None
) -> None:
    print(title)
    for key, count in rows:
        cost = f"  {count * us_per_sample:7.1f} us/req" if us_per_sample is not None else ""
        print(f"  {100 * count / total:5.1f}%{cost}  {key}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", default="", help="only frames whose file contains this")
    parser.add_argument("--lines", action="store_true", help="one entry per source line")
    parser.add_argument(
        "--requests",
        type=int,
        help="requests served while sampling: adds each entry's cost in us per request",
    )
    parser.add_argument("--rate", type=float, default=100.0, help="py-spy's --rate (Hz)")
    args = parser.parse_args(argv)
    summary = summarize(args.profile.read_text(encoding="utf-8").splitlines(), by_line=args.lines)
    if not summary.total:
        print("no samples")
        return 1

    us_per_sample = 1e6 / args.rate / args.requests if args.requests else None

    def keep(key: str) -> bool:
        return args.match in key

    print(f"{summary.total} samples")
    _print_table(
        "inclusive (on the stack):",
        [(k, c) for k, c in summary.inclusive.most_common() if keep(k)][: args.top],
        summary.total,
        us_per_sample,
    )
    _print_table(
        "self (on top of the stack):",
        [(k, c) for k, c in summary.self_time.most_common() if keep(k)][: args.top],
        summary.total,
        us_per_sample,
    )
    _print_table(
        "files (inclusive):",
        [(k, c) for k, c in summary.files.most_common() if keep(k)][: args.top],
        summary.total,
        us_per_sample,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
