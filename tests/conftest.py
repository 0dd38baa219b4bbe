"""Shared fixtures: one `backend` fixture parametrized over every backend.

PostgreSQL tests skip (saying why) when no server answers, unless `AIOHTTP_SESSION_STORE_REQUIRE_PG`
is set (CI sets it in .ci/run): then each of them fails with the reason instead. The browser
tests of the viewer do the same with `AIOHTTP_SESSION_STORE_REQUIRE_BROWSER`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from aiohttp_session_store.backends.base import Backend

PG_DSN = os.environ.get("AIOHTTP_SESSION_STORE_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
#: Set (to anything but "" or "0") where PostgreSQL must be tested: an unreachable server fails.
REQUIRE_PG_ENV = "AIOHTTP_SESSION_STORE_REQUIRE_PG"
REQUIRE_PG = os.environ.get(REQUIRE_PG_ENV, "") not in ("", "0")


def _pg_reachable() -> str | None:
    """None if the PostgreSQL server of `PG_DSN` answers, else why not."""
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        return "asyncpg is not installed (pip install -e '.[dev]')"
    url = urlsplit(PG_DSN)
    host, port = url.hostname or "127.0.0.1", url.port or 5432
    try:
        with socket.create_connection((host, port), timeout=1):
            return None
    except OSError as exc:
        return f"no PostgreSQL server at {host}:{port} ({exc})"


PG_UNAVAILABLE = _pg_reachable()


def pytest_report_header() -> str:
    if PG_UNAVAILABLE is None:
        return "postgresql: available"
    return f"postgresql: {'FAILING' if REQUIRE_PG else 'SKIPPED'}: {PG_UNAVAILABLE}"


def require_pg() -> None:
    """Skip, or with `REQUIRE_PG` fail, a test that needs the PostgreSQL server."""
    if PG_UNAVAILABLE is None:
        return
    if REQUIRE_PG:
        pytest.fail(
            f"PostgreSQL is required ({REQUIRE_PG_ENV} is set) but {PG_UNAVAILABLE}",
            pytrace=False,
        )
    pytest.skip(PG_UNAVAILABLE)


#: Set (to anything but "" or "0") where the viewer must be tested in a browser: a missing
#: chromium, chromedriver or selenium fails the browser tests instead of skipping them.
REQUIRE_BROWSER_ENV = "AIOHTTP_SESSION_STORE_REQUIRE_BROWSER"
REQUIRE_BROWSER = os.environ.get(REQUIRE_BROWSER_ENV, "") not in ("", "0")


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for name in ("chromium", "chromedriver"):
        if shutil.which(name) is None:
            return f"no {name} on PATH (apt-get install chromium chromium-driver)"
    return None


def require_browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths; skips, or with `REQUIRE_BROWSER` fails, without them."""
    missing = _browser_missing()
    if missing is not None:
        if REQUIRE_BROWSER:
            pytest.fail(
                f"a browser is required ({REQUIRE_BROWSER_ENV} is set) but {missing}",
                pytrace=False,
            )
        pytest.skip(missing)
    return str(shutil.which("chromium")), str(shutil.which("chromedriver"))


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sessions.db"


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema for one test, dropped afterwards (test isolation)."""
    require_pg()
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name

    async def drop() -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


def make_backend(kind: str, db_path: Path, pg_schema: str | None, **kwargs: object) -> Backend:
    if kind == "sqlite":
        from aiohttp_session_store.backends.sqlite import SQLiteBackend

        return SQLiteBackend(db_path, **kwargs)  # type: ignore[arg-type]
    from aiohttp_session_store.backends.postgres import PostgresBackend

    return PostgresBackend(PG_DSN, schema=pg_schema, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    if kind == "postgres":
        require_pg()
    return kind


@pytest.fixture
def backend_factory(
    backend_kind: str, db_path: Path, request: pytest.FixtureRequest
) -> Callable[..., Backend]:
    """Makes (unopened) backends on one store: the same file or the same PG schema."""
    schema = request.getfixturevalue("pg_schema") if backend_kind == "postgres" else None

    def factory(**kwargs: object) -> Backend:
        return make_backend(backend_kind, db_path, schema, **kwargs)

    return factory


@pytest.fixture
async def backend(backend_factory: Callable[..., Backend]) -> AsyncIterator[Backend]:
    b = backend_factory()
    await b.open()
    try:
        yield b
    finally:
        await b.close()


@contextlib.asynccontextmanager
async def loop_in_debug_mode(reports: list[str], label: str = "") -> AsyncIterator[None]:
    """The running loop in asyncio debug mode; what it reports is appended to `reports`.

    Debug mode reports coroutines never awaited (their origin tracked), tasks destroyed
    while pending and exceptions never retrieved through the loop's exception handler, and
    raises on a call into the loop from another thread. The handler stays on the loop: a
    task destroyed while pending is only reported when the garbage collector finds it,
    which may be after the test.
    """
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.set_exception_handler(
        lambda _loop, context: reports.append(f"{label}{context.get('message')}")
    )
    try:
        yield
    finally:
        loop.set_debug(False)


@pytest.fixture(scope="module")
def debug_reports() -> Iterator[list[str]]:
    """What debug mode reported in a module's tests; checked after one collection at its
    end (one `gc.collect()` per test cost more than debug mode itself)."""
    reports: list[str] = []
    yield reports
    gc.collect()
    assert not reports, reports


@pytest.fixture
async def debug_loop(
    debug_reports: list[str], request: pytest.FixtureRequest
) -> AsyncIterator[None]:
    """The test with its loop in debug mode, failing on anything reported while it ran.

    The middleware and capture suites use it (`pytestmark`), as aiohttp-sse runs its tests
    with the loop in debug mode: the same tests in the same run, not a second run of whole
    files in a subprocess.
    """
    before = len(debug_reports)
    async with loop_in_debug_mode(debug_reports, f"{request.node.nodeid}: "):
        yield
    reported = debug_reports[before:]
    del debug_reports[before:]
    assert not reported, reported
