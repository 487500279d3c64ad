"""Postgres, clock and factory fixtures.

The server comes from ``KAIJU_TASKS_TEST_DSN`` when it is set, else from the embedded PostgreSQL
the product itself uses (in its own data directory, kept between runs). A session fixture migrates
a template database (unique to the run and worker) with our own runner; every test that needs a
database gets a fresh copy of it, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from kaiju_tasks import testing
from kaiju_tasks.methods import Methods
from kaiju_tasks.rpc import server as rpc_server
from kaiju_tasks.service import NotificationService, TaskService, TokenService
from kaiju_tasks.store import migrate, postgres
from tests import rpc_fake

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


@pytest.fixture(scope="session")
def worker_id(request: pytest.FixtureRequest) -> str:
    """The pytest-xdist worker id, or "master"."""
    return getattr(request.config, "workerinput", {}).get("workerid", "master")


@pytest.fixture(scope="session")
async def template_db(server_dsn: str, worker_id: str) -> AsyncIterator[str]:
    """Name of a freshly migrated template database, unique to this run and worker.

    Unique names let two test runs share one server without dropping each other's template.
    """
    name = f"{TEMPLATE}_{worker_id}_{uuid.uuid4().hex[:8]}"
    await _admin(server_dsn, f'CREATE DATABASE "{name}"')
    try:
        await migrate.migrate(with_database(server_dsn, name))
        yield name
    finally:
        await _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _admin(server_dsn: str, statement: str) -> None:
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def _scratch_database(
    server_dsn: str, prefix: str, template: str | None = None
) -> AsyncIterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    await _admin(server_dsn, f'CREATE DATABASE "{name}"{copy}')
    try:
        yield with_database(server_dsn, name)
    finally:
        await _admin(server_dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def dsn(server_dsn: str, template_db: str) -> AsyncIterator[str]:
    """A fresh, migrated database of the test's own."""
    async with _scratch_database(server_dsn, "kaiju_tasks_test", template_db) as fresh:
        yield fresh


@pytest.fixture
async def empty_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no schema at all."""
    async with _scratch_database(server_dsn, "kaiju_tasks_empty") as fresh:
        yield fresh


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


@pytest.fixture
def make_api(store: postgres.PostgresTaskStore, clock: testing.FrozenClock):
    """Build the HTTP API (``rpc.server.Api``) over this test's database.

    ``methods`` defaults to an empty registry; every other option of ``Api`` passes through.
    ``/health`` always reports a database that answers.
    """

    def make(*, methods: Methods | None = None, **options) -> rpc_server.Api:
        async def health() -> dict[str, bool]:
            return {"database": True}

        return rpc_server.Api(
            tasks=TaskService(store, clock),
            notifications=NotificationService(store),
            tokens=TokenService(store, clock),
            methods=methods if methods is not None else Methods(),
            health=health,
            **options,
        )

    return make


@pytest.fixture
def rpc_target(aiohttp_server):
    """Start a JSON-RPC target (``tests/rpc_fake.py``) that records its calls.

    ``await rpc_target(answer, path=..., delay=...)`` returns a started ``RpcTarget``; its
    ``url`` is the address to give an executor as the app's URL.
    """

    async def make(
        answer: rpc_fake.Answer = rpc_fake.echo, *, path: str = "/rpc", delay: float = 0.0
    ) -> rpc_fake.RpcTarget:
        target = rpc_fake.RpcTarget(answer, path=path, delay=delay)
        server = await aiohttp_server(target.app())
        target.url = str(server.make_url(path))
        target.port = server.port
        return target

    return make
