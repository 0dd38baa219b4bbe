"""stats.py: aggregation of response facts, checked value by value (no database involved)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiohttp_session_store.models import ResponseFact
from aiohttp_session_store.stats import Percentiles, percentile, report, summarize


def fact(
    model: str | None = "m",
    outcome: str = "completed",
    *,
    duration: int = 100,
    first_byte: int | None = 10,
    tokens: tuple[int | None, int | None, int | None] = (10, 5, 15),
    session: str | None = "s",
) -> ResponseFact:
    return ResponseFact(session, model, outcome, *tokens, duration, first_byte)


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([], 50, None),
        ([7], 50, 7),
        ([7], 95, 7),
        ([1, 2, 3, 4], 50, 2),
        ([1, 2, 3, 4, 5], 50, 3),
        (list(range(1, 101)), 95, 95),
        (list(range(1, 101)), 50, 50),
        (list(range(1, 21)), 95, 19),
        ([1, 2], 95, 2),
        ([1, 2, 3], 100, 3),
        ([5, 5, 5, 900], 95, 900),
    ],
)
def test_percentile_nearest_rank(values: list[int], p: float, expected: int | None) -> None:
    assert percentile(values, p) == expected


@pytest.mark.parametrize("p", [0, -1, 100.5])
def test_percentile_refuses_out_of_range(p: float) -> None:
    with pytest.raises(ValueError, match="percentile"):
        percentile([1], p)


@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1))
def test_percentiles_are_observed_values_in_order(values: list[int]) -> None:
    result = Percentiles.of(values)
    assert result.p50 in values
    assert result.p95 in values
    assert result.p50 is not None
    assert result.p95 is not None
    assert min(values) <= result.p50 <= result.p95 <= max(values)


def test_summarize_empty() -> None:
    summary = summarize([])
    assert summary.to_json() == {
        "requests": 0,
        "outcomes": {
            "completed": 0,
            "client_disconnected": 0,
            "upstream_error": 0,
            "handler_error": 0,
        },
        "tokens": {"prompt": 0, "completion": 0, "total": 0},
        "calls_without_usage": 0,
        "duration_ms": {"p50": None, "p95": None},
        "first_byte_ms": {"p50": None, "p95": None},
    }


def test_summarize_counts_sums_and_skips_missing_values() -> None:
    facts = [
        fact(duration=100, first_byte=10),
        fact(duration=300, first_byte=None, tokens=(None, None, None), outcome="upstream_error"),
        fact(duration=200, first_byte=30, tokens=(7, 0, 7), outcome="client_disconnected"),
        fact(duration=50, first_byte=20, outcome="handler_error"),
    ]
    summary = summarize(facts)
    assert summary.requests == 4
    assert summary.outcomes == {
        "completed": 1,
        "client_disconnected": 1,
        "upstream_error": 1,
        "handler_error": 1,
    }
    assert (summary.prompt_tokens, summary.completion_tokens, summary.total_tokens) == (
        27,
        10,
        37,
    )
    # The call that carried no usage adds nothing, and is counted as such (a zero is usage).
    assert summary.without_usage == 1
    assert summary.duration_ms == Percentiles(p50=100, p95=300)
    # Only the three calls that sent a first byte count towards its percentiles.
    assert summary.first_byte_ms == Percentiles(p50=20, p95=30)


def test_unknown_outcomes_are_kept_after_the_known_ones() -> None:
    summary = summarize([fact(outcome="zzz"), fact(outcome="aaa"), fact()])
    assert list(summary.outcomes) == [
        "completed",
        "client_disconnected",
        "upstream_error",
        "handler_error",
        "aaa",
        "zzz",
    ]
    assert summary.outcomes["aaa"] == summary.outcomes["zzz"] == 1


def test_report_groups_by_model_sorted_with_none_last() -> None:
    facts = [
        fact("qwen-max", duration=10),
        fact(None, duration=20),
        fact("gpt-4o", duration=30),
        fact("qwen-max", duration=40, outcome="handler_error"),
        fact("Claude", duration=50),
    ]
    result = report(facts)
    assert [m for m, _ in result.by_model] == ["Claude", "gpt-4o", "qwen-max", None]
    qwen = dict(result.by_model)["qwen-max"]
    assert qwen.requests == 2
    assert qwen.outcomes["handler_error"] == 1
    assert qwen.duration_ms == Percentiles(10, 40)
    assert result.overall.requests == 5
    assert result.overall == summarize(facts)


def test_report_json_shape() -> None:
    out = report([fact("a", tokens=(1, 2, 3)), fact(None, tokens=(4, 5, 9))]).to_json()
    assert list(out) == [
        "requests",
        "outcomes",
        "tokens",
        "calls_without_usage",
        "duration_ms",
        "first_byte_ms",
        "by_model",
    ]
    assert out["tokens"] == {"prompt": 5, "completion": 7, "total": 12}
    assert [m["model"] for m in out["by_model"]] == ["a", None]
    assert out["by_model"][0] == {
        "model": "a",
        "requests": 1,
        "outcomes": {
            "completed": 1,
            "client_disconnected": 0,
            "upstream_error": 0,
            "handler_error": 0,
        },
        "tokens": {"prompt": 1, "completion": 2, "total": 3},
        "calls_without_usage": 0,
        "duration_ms": {"p50": 100, "p95": 100},
        "first_byte_ms": {"p50": 10, "p95": 10},
    }


def test_calls_without_usage_are_counted_per_model() -> None:
    facts = [
        fact("a", tokens=(None, None, None)),
        fact("a", tokens=(0, 0, 0)),  # usage that says zero is usage
        fact("a", tokens=(3, None, None)),  # partial usage is usage
        fact("b", tokens=(None, None, None)),
        fact("b"),
    ]
    result = report(facts)
    assert result.overall.without_usage == 2
    assert [(m, s.without_usage) for m, s in result.by_model] == [("a", 1), ("b", 1)]
    assert result.to_json()["calls_without_usage"] == 2


def test_report_accepts_any_iterable_once() -> None:
    result = report(fact(str(i % 2)) for i in range(6))
    assert result.overall.requests == 6
    assert [s.requests for _, s in result.by_model] == [3, 3]
