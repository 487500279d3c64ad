"""Postgres, clock and factory fixtures.

The server comes from ``KAIJU_TASKS_TEST_DSN`` when it is set, else from the embedded PostgreSQL
the product itself uses (in its own data directory, kept between runs). A session fixture migrates
``kaiju_tasks_test_template`` with our own runner; every test that needs a database gets a fresh
copy of it, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from kaiju_tasks import testing
from kaiju_tasks.service import NotificationService, TaskService
from kaiju_tasks.store import migrate, postgres

TEMPLATE = "kaiju_tasks_test_template"


def with_database(dsn: str, name: str) -> str:
    """Return ``dsn`` pointing at database ``name``."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """A DSN of the maintenance database of the test server."""
    dsn = os.environ.get("KAIJU_TASKS_TEST_DSN")
    if dsn:
        yield dsn
        return
    from kaiju_tasks.store import embedded

    data_dir = embedded.default_data_dir().with_name("postgres-test")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    server = embedded.EmbeddedPostgres(data_dir)
    try:
        yield server.start()
    finally:
        server.stop()


def _template_name(worker_id: str) -> str:
    return TEMPLATE if worker_id == "master" else f"{TEMPLATE}_{worker_id}"


@pytest.fixture(scope="session")
def worker_id(request: pytest.FixtureRequest) -> str:
    """The pytest-xdist worker id, or "master"."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")


@pytest.fixture(scope="session")
async def template_db(server_dsn: str, worker_id: str) -> str:
    """Name of a freshly migrated template database."""
    name = _template_name(worker_id)
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    await migrate.migrate(with_database(server_dsn, name))
    return name


@pytest.fixture
async def dsn(server_dsn: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database of the test's own."""
    name = f"kaiju_tasks_test_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await connection.close()
    yield with_database(server_dsn, name)
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@pytest.fixture
async def empty_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no schema at all."""
    name = f"kaiju_tasks_empty_{uuid.uuid4().hex[:12]}"
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    yield with_database(server_dsn, name)
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await connection.close()


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await postgres.create_pool(dsn, min_size=1, max_size=5, application_name="pytest")
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> postgres.PostgresEngineStore:
    return postgres.PostgresEngineStore(pool)


@pytest.fixture
def clock() -> testing.FrozenClock:
    return testing.FrozenClock()


@pytest.fixture
def task_service(store: postgres.PostgresTaskStore, clock: testing.FrozenClock) -> TaskService:
    return TaskService(store, clock)


@pytest.fixture
def notifications(store: postgres.PostgresTaskStore) -> NotificationService:
    return NotificationService(store)


@pytest.fixture
def make_task(store: postgres.PostgresTaskStore, clock: testing.FrozenClock):
    async def make(**overrides):
        return await testing.make_task(store, clock.now(), **overrides)

    return make
