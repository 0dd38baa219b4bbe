"""Statistics over recorded calls: counts, outcomes, token sums and latency percentiles by model.

Pure, no I/O: it aggregates `ResponseFact` values (`report`), or assembles the rows a
database aggregated (`report_from_rows`, what the CLI's `stats` and the query API use on a
big store); both give the same numbers for the same records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .models import OUTCOMES, ResponseFact

__all__ = (
    "Percentiles",
    "StatsReport",
    "Summary",
    "percentile",
    "report",
    "report_from_rows",
    "summarize",
)


#: A database row: a sequence of column values.
Row = Sequence[Any]


def percentile(sorted_values: Sequence[int], p: float) -> int | None:
    """The nearest-rank `p`th percentile of ascending `sorted_values` (None when empty).

    Nearest rank always answers with a value that was observed (no interpolation), so a
    p95 of durations is the duration of a real call.
    """
    if not 0 < p <= 100:
        raise ValueError(f"a percentile is in (0, 100], not {p}")
    if not sorted_values:
        return None
    rank = math.ceil(p / 100 * len(sorted_values))
    return sorted_values[max(rank, 1) - 1]


@dataclass(frozen=True, slots=True)
class Percentiles:
    """p50 and p95 of the calls that have the measure (None when none has it)."""

    p50: int | None
    p95: int | None

    @classmethod
    def of(cls, values: Iterable[int]) -> Percentiles:
        ordered = sorted(values)
        return cls(percentile(ordered, 50), percentile(ordered, 95))

    def to_json(self) -> dict[str, int | None]:
        return {"p50": self.p50, "p95": self.p95}


@dataclass(frozen=True, slots=True)
class Summary:
    """Aggregates over a set of calls (each one response)."""

    requests: int
    #: Every known outcome (zero when unseen), then any other value found, by name.
    outcomes: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    #: Calls whose reply carried no usage at all: their tokens are unknown, not zero.
    without_usage: int
    duration_ms: Percentiles
    first_byte_ms: Percentiles

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "outcomes": dict(self.outcomes),
            "tokens": {
                "prompt": self.prompt_tokens,
                "completion": self.completion_tokens,
                "total": self.total_tokens,
            },
            "calls_without_usage": self.without_usage,
            "duration_ms": self.duration_ms.to_json(),
            "first_byte_ms": self.first_byte_ms.to_json(),
        }


@dataclass(frozen=True, slots=True)
class StatsReport:
    """All calls together, and the same per model (ordered by name, calls without one last)."""

    overall: Summary
    by_model: tuple[tuple[str | None, Summary], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            **self.overall.to_json(),
            "by_model": [{"model": model, **summary.to_json()} for model, summary in self.by_model],
        }


def summarize(facts: Iterable[ResponseFact]) -> Summary:
    """Aggregate `facts`; missing token counts add nothing (calls with none at all are
    counted apart), missing first bytes are skipped."""
    items = list(facts)
    outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
    for fact in items:
        outcomes[fact.outcome] = outcomes.get(fact.outcome, 0) + 1
    unknown = sorted(k for k in outcomes if k not in OUTCOMES)
    return Summary(
        requests=len(items),
        outcomes={**{k: outcomes[k] for k in OUTCOMES}, **{k: outcomes[k] for k in unknown}},
        prompt_tokens=sum(f.prompt_tokens or 0 for f in items),
        completion_tokens=sum(f.completion_tokens or 0 for f in items),
        total_tokens=sum(f.total_tokens or 0 for f in items),
        without_usage=sum(
            1
            for f in items
            if f.prompt_tokens is None and f.completion_tokens is None and f.total_tokens is None
        ),
        duration_ms=Percentiles.of(f.duration_ms for f in items),
        first_byte_ms=Percentiles.of(f.first_byte_ms for f in items if f.first_byte_ms is not None),
    )


def report(facts: Iterable[ResponseFact]) -> StatsReport:
    """The overall summary and one per model."""
    items = list(facts)
    groups: dict[str | None, list[ResponseFact]] = {}
    for fact in items:
        groups.setdefault(fact.model, []).append(fact)
    # Calls recorded without a model (a body that was not JSON) sort after named models.
    order = sorted(groups, key=lambda m: (m is None, m or ""))
    return StatsReport(
        overall=summarize(items),
        by_model=tuple((model, summarize(groups[model])) for model in order),
    )


def _histogram_percentiles(counts: dict[int, int]) -> Percentiles:
    """Nearest-rank p50/p95 from {value: calls}, the same as `percentile` of the calls."""
    n = sum(counts.values())
    if not n:
        return Percentiles(None, None)
    wanted = {p: max(math.ceil(p / 100 * n), 1) for p in (50, 95)}
    found: dict[int, int] = {}
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        for p, rank in wanted.items():
            if p not in found and seen >= rank:
                found[p] = value
    return Percentiles(found[50], found[95])


def report_from_rows(aggregates: Iterable[Row], first_bytes: Iterable[Row]) -> StatsReport:
    """The report of what a database aggregated (`backends.reads.stats_sql`): rows (model,
    outcome, duration_ms, calls, prompt, completion, total, calls without usage) and
    (model, first_byte_ms, calls). Equal to `report` of the same responses."""
    groups: dict[str | None, list[Row]] = {}
    for row in aggregates:
        groups.setdefault(row[0], []).append(row)
    first: dict[str | None, dict[int, int]] = {}
    for model, value, calls in first_bytes:
        first.setdefault(model, {})[int(value)] = int(calls)

    def summary(rows: list[Row], first_byte: dict[int, int]) -> Summary:
        outcomes: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        durations: dict[int, int] = {}
        for row in rows:
            outcomes[str(row[1])] = outcomes.get(str(row[1]), 0) + int(row[3])
            durations[int(row[2])] = durations.get(int(row[2]), 0) + int(row[3])
        unknown = sorted(k for k in outcomes if k not in OUTCOMES)
        return Summary(
            requests=sum(int(r[3]) for r in rows),
            outcomes={**{k: outcomes[k] for k in OUTCOMES}, **{k: outcomes[k] for k in unknown}},
            prompt_tokens=sum(int(r[4] or 0) for r in rows),
            completion_tokens=sum(int(r[5] or 0) for r in rows),
            total_tokens=sum(int(r[6] or 0) for r in rows),
            without_usage=sum(int(r[7] or 0) for r in rows),
            duration_ms=_histogram_percentiles(durations),
            first_byte_ms=_histogram_percentiles(first_byte),
        )

    every_first: dict[int, int] = {}
    for histogram in first.values():
        for value, calls in histogram.items():
            every_first[value] = every_first.get(value, 0) + calls
    order = sorted(groups, key=lambda m: (m is None, m or ""))
    return StatsReport(
        overall=summary([row for rows in groups.values() for row in rows], every_first),
        by_model=tuple((m, summary(groups[m], first.get(m, {}))) for m in order),
    )
