"""Backends terminated under the store's pool: a broken connection never reaches a caller.

``pg_terminate_backend`` hits this test's own database only: mid-query, mid-transaction and
mid-COPY, many times. The call that was running fails with a StoreError; every later call gets a
working connection (reads are tried again on a fresh one), and none ever sees "another operation
is in progress".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import asyncpg
import pytest

from kaiju_tasks import Task, TaskCommand, errors, testing
from kaiju_tasks.service import TaskService
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import eventually

pytestmark = pytest.mark.timeout(180)

ROUNDS = 15
APP_NAME = "kaiju-tasks-faults"


@pytest.fixture
async def faulty(dsn):
    pool = await postgres.create_pool(dsn, min_size=3, max_size=4, application_name=APP_NAME)
    yield postgres.PostgresEngineStore(pool)
    await pool.close()


async def _kill_when(server_dsn: str, dsn: str, where: str) -> int:
    """Terminate every backend of the pool as soon as one matches ``where``; return how many."""
    database = urlsplit(dsn).path.lstrip("/")
    admin = await asyncpg.connect(server_dsn)
    try:
        await eventually(
            lambda: admin.fetchval(
                f"SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                f" AND application_name = $2 AND {where}",
                database,
                APP_NAME,
            ),
            what=where,
        )
        killed: int = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = $1 AND application_name = $2",
            database,
            APP_NAME,
        )
        return killed
    finally:
        await admin.close()


async def _fails_cleanly(call: Awaitable[object]) -> None:
    with pytest.raises(errors.StoreError) as caught:
        await call
    assert "another operation is in progress" not in str(caught.value)


async def _all_work(
    store: postgres.PostgresEngineStore, task_id: str, *, writes: bool = True
) -> None:
    """Reads, a heartbeat and a write, each on the first try (reads may retry inside)."""
    now = testing.DEFAULT_NOW
    assert (await store.get_task(task_id)) is not None
    assert task_id in await store.task_status([task_id])
    if writes:  # both write events
        await store.heartbeat("faults", active=0, now=now)
        assert await store.claim(["nobody"], "faults", limit=1, now=now) == []
    assert await store.orphans("faults", []) == []


async def _rounds(
    server_dsn: str,
    dsn: str,
    store: postgres.PostgresEngineStore,
    task_id: str,
    victim: Callable[[], Awaitable[object]],
    where: str,
    *,
    writes: bool = True,
) -> None:
    for _ in range(ROUNDS):
        running = asyncio.create_task(_fails_cleanly(victim()))
        assert await _kill_when(server_dsn, dsn, where) >= 1
        await running
        await _all_work(store, task_id, writes=writes)


async def test_killed_mid_query(server_dsn, dsn, faulty, make_task):
    task = await make_task()

    async def slow_query() -> None:
        async with faulty._connection() as connection:
            await connection.execute("SELECT pg_sleep(30)")

    await _rounds(server_dsn, dsn, faulty, task["id"], slow_query, "query LIKE '%pg_sleep%'")


async def test_killed_mid_transaction(server_dsn, dsn, faulty, make_task):
    task = await make_task()

    async def open_transaction() -> None:
        async with faulty._connection() as connection, connection.transaction():
            await connection.execute(
                "UPDATE tasks SET priority = priority WHERE id = $1", task["id"]
            )
            await connection.execute("SELECT 1, pg_sleep(0) FROM pg_sleep(30)")

    # Killed while it holds a row lock in an open transaction, then in its last statement.
    await _rounds(
        server_dsn, dsn, faulty, task["id"], open_transaction, "query LIKE '%pg_sleep(30)%'"
    )
    row = await faulty.get_task(task["id"])
    assert row is not None


async def test_killed_mid_copy(server_dsn, dsn, faulty, make_task):
    task = await make_task()
    many = [Task(app="faults", commands=[TaskCommand(method="m")]) for _ in range(2000)]
    blocker = await asyncpg.connect(dsn)
    try:
        # The COPY of the tasks' events waits on this lock, so it is killed mid-COPY every time.
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE events IN SHARE MODE")

        async def copy() -> None:
            await TaskService(faulty).create(many, columns=["id"])

        await _rounds(
            server_dsn,
            dsn,
            faulty,
            task["id"],
            copy,
            "query LIKE 'COPY%' AND wait_event_type = 'Lock'",
            writes=False,  # events are locked
        )
        await transaction.rollback()
        assert await blocker.fetchval("SELECT count(*) FROM tasks WHERE app_name = 'faults'") == 0
        # And with the lock gone, the same COPY goes through.
        created = await TaskService(faulty).create(many, columns=["id"])
        assert len(created) == len(many)
    finally:
        await blocker.close()
