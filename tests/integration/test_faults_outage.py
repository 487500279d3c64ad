"""A database outage longer than the rescue window, on a private cluster the test stops.

The executor and the manager outlive the outage. Once the database is back, no live executor
may be taken for lost (its tasks re-queued, their stages run a second time), every task must
finish, and the outage must be logged as one line per component when it begins, reminders
without tracebacks, and one line per component when the database is back.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from kaiju_tasks import Executor, Manager
from kaiju_tasks.manager.steps import Settings
from kaiju_tasks.service import TaskService
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import eventually
from tests import rpc_fake
from tests.chaos import cluster as cluster_
from tests.chaos import harness

pytestmark = pytest.mark.timeout(240)

STALE_AFTER = timedelta(seconds=3)
OUTAGE = 8.0  # seconds the server stays down: well past STALE_AFTER


class Records(logging.Handler):
    """Keeps every record of kaiju_tasks and asyncpg loggers at WARNING or above."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(("kaiju_tasks", "asyncpg")):
            self.records.append(record)


async def _create(service: TaskService, first: int, count: int) -> list[str]:
    created = await service.create(
        [harness.three_stage_task(n) for n in range(first, first + count)], columns=["id"]
    )
    assert isinstance(created, list)
    return [t["id"] for t in created]


@pytest.fixture(scope="module")
async def outage() -> Any:
    """Runs the scenario once: tasks before, during and after an 8 s outage."""
    records = Records()
    root = logging.getLogger()
    root.addHandler(records)
    old_level = root.level
    root.setLevel(logging.INFO)
    outcome: dict[str, Any] = {}
    try:
        with cluster_.private_cluster() as cluster:
            dsn = await harness.migrated_database(cluster.dsn())
            async with harness.counting_target(delay=0.3) as target:
                pool = await postgres.create_pool(dsn, max_size=10)
                store = postgres.PostgresEngineStore(pool)
                service = TaskService(store)
                executor = Executor(
                    store,
                    apps=[harness.APP],
                    app_urls={harness.APP: target.url},
                    dsn=dsn,
                    concurrency=8,
                    heartbeat_interval=timedelta(seconds=1),
                    poll_interval=timedelta(seconds=0.2),
                )
                manager = Manager(
                    store,
                    leadership=postgres.AdvisoryLeadership(dsn, check_timeout=2),
                    dsn=dsn,
                    settings=Settings(stale_after=STALE_AFTER),
                    interval=timedelta(seconds=0.2),
                    standby_interval=timedelta(seconds=0.3),
                )
                try:
                    async with executor, manager:
                        await eventually(lambda: manager.is_leader, what="a leader")
                        ids = await _create(service, 0, 40)
                        await eventually(lambda: target.calls, what="stages to run")
                        records.records.clear()  # what the outage writes, from here on
                        await asyncio.to_thread(cluster.stop)
                        await asyncio.sleep(OUTAGE)  # the fault itself, not a wait for a result
                        await asyncio.to_thread(cluster.start)

                        async def created_after() -> list[str]:
                            try:
                                return await _create(service, 40, 40)
                            except Exception:  # noqa: BLE001 - the pool reconnecting
                                return []

                        # Claimed by the live executor right after the database came back.
                        ids += await eventually(created_after, within=30, what="the database")
                        await eventually(
                            lambda: harness.all_finished(dsn, ids),
                            within=120,
                            what="every task to finish",
                        )
                        outcome["components"] = {
                            f"executor {executor.id}",
                            f"executor {executor.id} listener",
                            "manager",
                            "manager listener",
                        }
                    connection = await asyncpg.connect(dsn)
                    try:
                        outcome["rescued"] = await connection.fetchval(
                            "SELECT count(*) FROM events WHERE type = 'task-suspended'"
                            " AND data->>'reason' = 'executor lost'"
                        )
                    finally:
                        await connection.close()
                finally:
                    await pool.close()
                outcome["ids"] = ids
                outcome["target"] = target
    finally:
        root.removeHandler(records)
        root.setLevel(old_level)
    outcome["records"] = records.records
    return outcome


async def test_no_live_executor_is_rescued_and_no_stage_runs_twice_after_an_outage(outage):
    target: rpc_fake.RpcTarget = outage["target"]
    assert target.twice() == {}
    calls = harness.stage_calls(target, outage["ids"])
    assert set(calls.values()) == {3}
    assert outage["rescued"] == 0


async def test_an_outage_is_logged_once_per_component_then_back_after(outage):
    records: list[logging.LogRecord] = outage["records"]
    assert not [r for r in records if r.exc_info], "no traceback during an outage"
    # asyncpg's pool retries its connection floor every second: one short line of it at most.
    assert len([r for r in records if r.name == "asyncpg.pool"]) <= 1
    events = [(getattr(r, "event", None), getattr(r, "component", None)) for r in records]
    for component in outage["components"]:
        assert events.count(("database_lost", component)) == 1, (component, events)
        assert events.count(("database_back", component)) == 1, (component, events)
    back = [r.getMessage() for r in records if getattr(r, "event", None) == "database_back"]
    assert all("database back after" in m for m in back)
    # Four components, one line lost, one back, at most a reminder or two each in 8 s.
    assert len(records) <= 20, [r.getMessage() for r in records]
