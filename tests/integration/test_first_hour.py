"""Apps with queued tasks and no live executor, as /health, /metrics and monitor report them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from kaiju_tasks import Task, TaskCommand, config, insights, methods
from kaiju_tasks.cli import _api
from kaiju_tasks.clock import SystemClock
from kaiju_tasks.insights import ALIVE_WITHIN
from kaiju_tasks.metrics import Metrics
from kaiju_tasks.service import TaskService
from kaiju_tasks.store import postgres


async def _queue(store: postgres.PostgresEngineStore, app: str, count: int = 1) -> None:
    for _ in range(count):
        await TaskService(store).create(Task(app=app, commands=[TaskCommand(method="m")]))


def test_unserved_is_what_no_live_executor_serves() -> None:
    now = SystemClock().now()
    since = now - ALIVE_WITHIN
    workers: list[dict[str, Any]] = [
        {"apps": ["a"], "heartbeat_at": now.isoformat(), "stopped_at": None},
        {"apps": ["b"], "heartbeat_at": now, "stopped_at": now},  # stopped
        {"apps": ["c"], "heartbeat_at": since - timedelta(seconds=1), "stopped_at": None},  # silent
    ]
    queued = {"a": 1, "b": 2, "c": 3, "d": 0}
    assert insights.unserved(queued, workers, alive_since=since) == ["b", "c"]


async def test_unserved_apps_and_served_apps_read_the_executors_table(
    store: postgres.PostgresEngineStore,
) -> None:
    await _queue(store, "billing", 2)
    await _queue(store, "orders")
    now = SystemClock().now()
    since = now - ALIVE_WITHIN
    reads = insights.Insights(store)
    assert [
        (u["app"], u["queued"])
        for u in await reads.unserved_apps(now=now, alive_since=since, limit=None)
    ] == [("billing", 2), ("orders", 1)]
    await store.register_executor(
        "ex", apps=["orders", "other"], host="h", pid=1, concurrency=1, now=now
    )
    unserved = await reads.unserved_apps(now=now, alive_since=since, limit=None)
    assert [u["app"] for u in unserved] == ["billing"]
    assert unserved[0]["waiting_s"] >= 0
    assert await reads.served_apps(alive_since=since) == {"orders", "other"}
    await store.executor_stopped("ex", now=now)
    assert await reads.served_apps(alive_since=since) == set()
    assert len(await reads.unserved_apps(now=now, alive_since=since, limit=1)) == 1


async def test_health_and_metrics_show_apps_nobody_serves(
    store: postgres.PostgresEngineStore, dsn: str
) -> None:
    await _queue(store, "billing", 3)
    await _queue(store, "orders")
    await store.register_executor(
        "ex", apps=["orders"], host="h", pid=1, concurrency=1, now=SystemClock().now()
    )
    api = _api(store, methods.Methods(), config.Settings())
    health = await api.health()
    assert [(u["app"], u["queued"]) for u in health["unserved_apps"]] == [("billing", 3)]
    metrics = Metrics(store, dsn)
    text = (await metrics.render()).decode()
    assert 'kaiju_tasks_unserved_tasks{app="billing"} 3.0' in text
    assert 'kaiju_tasks_unserved_tasks{app="orders"}' not in text


async def test_the_leader_warns_once_per_app_nobody_serves_and_says_when_it_is_served(
    store: postgres.PostgresEngineStore, caplog: Any
) -> None:
    import logging

    from kaiju_tasks.manager import Manager

    await _queue(store, "billing", 2)
    clock = SystemClock()
    manager = Manager(store, clock=clock, gc=False)
    later = clock.now() + timedelta(seconds=20)  # past the grace an executor gets to start
    with caplog.at_level(logging.INFO, logger="kaiju_tasks.manager"):
        assert (await manager.tick(later))["watch_unserved"] == 1
        # Reported once: the next looks (every 30 s) say nothing more while nothing changes.
        assert (await manager.tick(later + timedelta(seconds=31)))["watch_unserved"] == 0
        served_at = later + timedelta(seconds=62)
        await store.register_executor(
            "ex", apps=["billing"], host="h", pid=1, concurrency=1, now=served_at
        )
        await manager.tick(served_at)
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "app_unserved"]
    assert [(r.app, r.queued) for r in warnings] == [("billing", 2)]
    assert "kaiju-tasks executor --app billing" in warnings[0].getMessage()
    served = [r for r in caplog.records if getattr(r, "event", None) == "app_served"]
    assert [r.app for r in served] == ["billing"]
