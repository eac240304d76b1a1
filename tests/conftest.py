"""Shared fixtures: databases (SQLite and PostgreSQL), one local Ray and one live server per
test session."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from service import migrate
from service.db import Database
from tests.service.live import LocalServer, local_server
from workers.ray_executor import RayExecutor

PG_ENV = "TSAM_TEST_DATABASE_URL"


def _postgres_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} is not set (make test and .ci/run set it)")
    return url


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards: tests share
    the `test` database without seeing each other's tables."""
    base = _postgres_url()
    schema = f"tsam_test_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(base)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """The same test against a SQLite file and against PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tsam.db'}"
    return request.getfixturevalue("pg_schema_url")


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A migrated database."""
    yield from _migrated(db_url)


@pytest.fixture
def pg_db(pg_schema_url: str) -> Iterator[Database]:
    """A migrated PostgreSQL database, for tests of what only PostgreSQL does."""
    yield from _migrated(pg_schema_url)


def _migrated(url: str) -> Iterator[Database]:
    migrate.upgrade(url)
    database = Database(url)
    yield database
    database.dispose()


# -- Ray: one embedded local Ray per test session --------------------------------------------
# Starting Ray takes seconds (tens under load) and a cold worker pays seconds to import torch,
# so every test that needs Ray shares this one. Tests carry @pytest.mark.ray.


@pytest.fixture(scope="session")
def ray_executor() -> Iterator[RayExecutor]:
    """The session's RayExecutor (2 CPUs, 2 warm workers); it owns the embedded Ray. Shared:
    call ``start(notify)`` to route notifications to your test and ignore events of runs you
    did not submit -- or use ``fresh_ray_executor``."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # A short private directory: Ray's Unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="tsam-ray-")
    executor = RayExecutor(num_cpus=2, warm_workers=2, temp_dir=temp_dir)
    try:
        executor.start(lambda: None)
        executor.wait_until_warm(timeout=300)
        yield executor
    finally:
        executor.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def fresh_ray_executor(ray_executor: RayExecutor) -> Iterator[RayExecutor]:
    """A new, not yet started RayExecutor on the session's Ray, with its own events; shutting
    it down leaves Ray running."""
    executor = RayExecutor()
    yield executor
    executor.shutdown()


# -- one live server per session, on the session's Ray ---------------------------------------


@pytest.fixture(scope="session")
def live_server(ray_executor: RayExecutor, tmp_path_factory) -> Iterator[LocalServer]:
    """``tsam serve`` in a thread: uvicorn, the scheduler and a RayExecutor on the session's
    Ray, over a SQLite file."""
    with local_server(tmp_path_factory.mktemp("live"), executor=RayExecutor()) as server:
        yield server
