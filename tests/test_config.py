"""StoreConfig: durations in every form, the byte bounds, and errors that name their field."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from aiohttp_session_store import StoreConfig
from aiohttp_session_store.models import now_ms


def with_field(name: str, value: Any) -> StoreConfig:
    kwargs: dict[str, Any] = {name: value}
    return StoreConfig(**kwargs)


DURATIONS = ("session_timeout", "sweep_interval", "flush_interval", "shutdown_timeout")


@pytest.mark.parametrize("name", [*DURATIONS, "log_retention"])
@pytest.mark.parametrize(
    ("given", "seconds"),
    [
        (90, 90.0),
        (0.25, 0.25),
        (timedelta(minutes=5), 300.0),
        ("90s", 90.0),
        ("5m", 300.0),
        ("30d", 30 * 86_400.0),
        ("1h30m", 5_400.0),
    ],
)
def test_durations_take_seconds_timedeltas_and_strings(
    name: str, given: Any, seconds: float
) -> None:
    config = with_field(name, given)
    value = getattr(config, name)
    assert value == seconds
    assert isinstance(value, float)


def test_defaults() -> None:
    config = StoreConfig()
    assert (config.session_timeout, config.sweep_interval, config.flush_interval) == (
        1800.0,
        600.0,
        0.05,
    )
    assert config.log_retention is None
    assert config.shutdown_timeout == 10.0
    assert config.clock is now_ms
    assert config.max_pending_bytes >= config.max_batch_bytes


@pytest.mark.parametrize("name", [*DURATIONS, "log_retention"])
@pytest.mark.parametrize("bad", [0, -1, "0s", "30", "5M", "soon", timedelta(0), float("nan")])
def test_bad_duration_values_name_the_field(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{name}: "):
        with_field(name, bad)


@pytest.mark.parametrize("name", [*DURATIONS, "log_retention"])
@pytest.mark.parametrize("bad", [[1], b"30s", True, object()])
def test_duration_of_a_wrong_type_is_a_type_error_naming_the_field(name: str, bad: Any) -> None:
    with pytest.raises(TypeError, match=rf"^{name}: "):
        with_field(name, bad)


@pytest.mark.parametrize(
    ("name", "least"),
    [
        ("max_body_bytes", 0),
        ("max_pending_records", 1),
        ("max_pending_bytes", 1),
        ("max_batch_bytes", 1),
        ("max_first_message_bytes", 64),
        ("max_cached_sessions", 1),
        ("max_cache_bytes", 1),
        ("sweep_batch_size", 1),
    ],
)
def test_sizes_have_a_floor_and_must_be_integers(name: str, least: int) -> None:
    assert getattr(with_field(name, least), name) == least
    with pytest.raises(ValueError, match=rf"^{name}: must be >= {least}"):
        with_field(name, least - 1)
    for bad in (1.5, "10", True):
        with pytest.raises(TypeError, match=rf"^{name}: "):
            with_field(name, bad)


def test_durability_is_batched_or_sync() -> None:
    assert StoreConfig(durability="sync").durability == "sync"
    with pytest.raises(ValueError, match=r"^durability: must be 'batched' or 'sync'"):
        StoreConfig(durability="eventually")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["paths", "redact_headers", "extra_redact_headers"])
def test_header_and_path_lists(name: str) -> None:
    config = with_field(name, ["/a", "/b"])
    assert getattr(config, name) == ("/a", "/b")  # any iterable, stored as a tuple
    with pytest.raises(TypeError, match=rf"^{name}: must be a tuple of strings, not a string"):
        with_field(name, "/a")
    with pytest.raises(TypeError, match=rf"^{name}: "):
        with_field(name, ["/a", 3])
    with pytest.raises(TypeError, match=rf"^{name}: "):
        with_field(name, 3)


def test_string_and_callable_fields() -> None:
    with pytest.raises(TypeError, match=r"^session_header: "):
        StoreConfig(session_header="")
    with pytest.raises(TypeError, match=r"^scope_header: "):
        StoreConfig(scope_header="")
    with pytest.raises(TypeError, match=r"^redact_body: "):
        StoreConfig(redact_body="nope")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^clock: "):
        StoreConfig(clock=12)  # type: ignore[arg-type]


def test_the_config_is_frozen_hashable_and_replace_validates_again() -> None:
    config = StoreConfig(session_timeout="5m", clock=lambda: 7)
    assert config.clock() == 7
    assert hash(config) == hash(config.replace())
    assert config == config.replace()
    with pytest.raises(AttributeError):
        config.session_timeout = 1  # type: ignore[misc]
    assert config.replace(log_retention="7d").log_retention == 7 * 86_400.0
    with pytest.raises(ValueError, match=r"^sweep_interval: "):
        config.replace(sweep_interval=-5)
