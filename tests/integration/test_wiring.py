"""kaiju_tasks.wiring against a real database: the CLI's store and TaskRuntime's components."""

from __future__ import annotations

from typing import Any

import pytest

from kaiju_tasks import TaskRuntime, config, errors, wiring
from kaiju_tasks.store import postgres


async def test_engine_store_opens_the_configured_pool_on_a_current_schema(dsn):
    settings = config.Settings(database=config.DatabaseSettings(dsn=dsn, pool_min=1, pool_max=2))
    async with wiring.engine_store(settings, dsn, "kaiju-tasks-test") as store:
        assert store.pool.get_max_size() == 2
        async with store.pool.acquire() as connection:
            name = await connection.fetchval("SELECT current_setting('application_name')")
        assert name == "kaiju-tasks-test"


async def test_engine_store_refuses_a_database_that_is_not_migrated(empty_dsn):
    settings = config.Settings(database=config.DatabaseSettings(dsn=empty_dsn))
    with pytest.raises(errors.KaijuTasksError):
        async with wiring.engine_store(settings, empty_dsn):
            pass


async def test_task_runtime_builds_its_components_through_the_wiring(dsn, monkeypatch):
    opened = []
    create_pool = postgres.create_pool

    async def spy(pool_dsn, **options):
        opened.append((pool_dsn, options))
        return await create_pool(pool_dsn, **options)

    monkeypatch.setattr(postgres, "create_pool", spy)
    async with TaskRuntime(
        dsn,
        direct_dsn=dsn,
        apps=["orders"],
        pool_size=3,
        manager_options={"scheduler": False},
        executor_options={"concurrency": 2},
    ) as runtime:
        body = {"id": "wired", "app_name": "elsewhere", "commands": [{"method": "x.y"}]}
        created: Any = await runtime.tasks.create(body)
        assert created["id"] == "wired"  # the pool works
        assert runtime.manager is not None
        assert runtime.executor is not None
        assert isinstance(runtime.manager.leadership, postgres.AdvisoryLeadership)
        assert runtime.manager.leadership.key == postgres.GC_LOCK_KEY
        assert not runtime.manager.scheduler
        assert runtime.executor.concurrency == 2
        assert runtime.executor.apps == ["orders"]
    assert opened == [
        (
            dsn,
            {"min_size": 1, "max_size": 3, "application_name": "kaiju-tasks-app", "pooler": True},
        )
    ]
