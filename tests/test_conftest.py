"""conftest.py's PostgreSQL gate: skip with the reason locally, fail where it is required (CI).

Runs pytest in a subprocess against a DSN where nothing listens, with and without
`AIOHTTP_SESSION_STORE_REQUIRE_PG`.
"""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import loop_in_debug_mode

ROOT = Path(__file__).resolve().parent.parent
PG_TEST = "tests/test_backends.py::test_close_is_idempotent[postgres]"
SQLITE_TEST = "tests/test_backends.py::test_close_is_idempotent[sqlite]"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nothing listens there


def _pytest(require: str | None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "AIOHTTP_SESSION_STORE_PG_DSN": f"postgresql://postgres@127.0.0.1:{_closed_port()}/test",
    }
    env.pop("AIOHTTP_SESSION_STORE_REQUIRE_PG", None)
    if require is not None:
        env["AIOHTTP_SESSION_STORE_REQUIRE_PG"] = require
    # Without the hypothesis plugin: importing it is most of a subprocess's start-up.
    args = ["-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rs", PG_TEST, SQLITE_TEST]
    return subprocess.run(
        [sys.executable, "-m", "pytest", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_unreachable_postgres_skips_with_the_reason_locally() -> None:
    done = _pytest(None)
    assert done.returncode == 0, done.stdout
    assert "1 passed, 1 skipped" in done.stdout
    assert "no PostgreSQL server at 127.0.0.1:" in done.stdout
    assert "postgresql: SKIPPED" in done.stdout


@pytest.mark.slow
def test_a_zero_requirement_still_skips() -> None:
    done = _pytest("0")
    assert done.returncode == 0, done.stdout
    assert "1 skipped" in done.stdout


@pytest.mark.slow
def test_unreachable_postgres_fails_when_required() -> None:
    done = _pytest("1")
    assert done.returncode == 1, done.stdout
    assert "skipped" not in done.stdout
    assert "1 passed, 1 error" in done.stdout
    assert "PostgreSQL is required (AIOHTTP_SESSION_STORE_REQUIRE_PG is set) but no PostgreSQL" in (
        done.stdout
    )
    assert "postgresql: FAILING" in done.stdout


# -- the loop in debug mode ------------------------------------------------------------------


async def test_debug_mode_reports_an_exception_never_retrieved() -> None:
    reports: list[str] = []
    async with loop_in_debug_mode(reports, "t: "):
        future = asyncio.get_running_loop().create_future()
        future.set_exception(ValueError("lost"))
        del future
    assert reports == ["t: Future exception was never retrieved"]


async def test_debug_mode_reports_a_task_destroyed_while_pending() -> None:
    async def forever() -> None:
        await asyncio.Event().wait()

    reports: list[str] = []
    async with loop_in_debug_mode(reports):
        asyncio.get_running_loop().create_task(forever())
        await asyncio.sleep(0)
    # Reported only once collected: after the test's body, as the module's check does.
    gc.collect()
    assert reports == ["Task was destroyed but it is pending!"]


async def test_debug_mode_leaves_a_clean_test_alone_and_switches_off() -> None:
    loop = asyncio.get_running_loop()
    reports: list[str] = []
    async with loop_in_debug_mode(reports):
        assert loop.get_debug()
        await asyncio.sleep(0)
    gc.collect()
    assert reports == []
    assert not loop.get_debug()
