"""The read service without a database: how Insights combines the InsightsStore's figures."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from kaiju_tasks import insights
from kaiju_tasks.store import base

NOW = datetime(2030, 1, 1, 12, 30, 20, tzinfo=UTC)


class FakeReads:
    """An InsightsStore answering fixed figures and counting the reads."""

    def __init__(self, **figures: Any) -> None:
        self.figures: dict[str, Any] = {
            "task_counts": [],
            "queue_lag": [],
            "cluster": {"leader": True, "executors": 0, "debug_executors": 0, "events": 0},
            "workers": [],
            "active_tasks": [],
            "throughput": [],
            "unserved_apps": [],
            "served_apps": set(),
            "events_after": [],
        }
        self.figures.update(figures)
        self.reads: list[tuple[str, dict[str, Any]]] = []

    def _read(self, name: str, **args: Any) -> Any:
        self.reads.append((name, args))
        return self.figures[name]

    async def task_counts(self) -> Any:
        return self._read("task_counts")

    async def queue_lag(self, *, now: datetime) -> Any:
        return self._read("queue_lag", now=now)

    async def cluster(self, *, alive_since: datetime) -> Any:
        return self._read("cluster", alive_since=alive_since)

    async def workers(self, *, heard_since: datetime, limit: int | None) -> Any:
        return self._read("workers", heard_since=heard_since, limit=limit)

    async def active_tasks(self, *, limit: int) -> Any:
        return self._read("active_tasks", limit=limit)

    async def top(self, *, heard_since: datetime, limit: int) -> Any:
        return {
            "workers": await self.workers(heard_since=heard_since, limit=None),
            "tasks": await self.active_tasks(limit=limit),
            "counts": await self.task_counts(),
        }

    async def throughput(self, *, now: datetime, minutes: int) -> Any:
        return self._read("throughput", now=now, minutes=minutes)

    async def unserved_apps(
        self, *, now: datetime, alive_since: datetime, limit: int | None
    ) -> Any:
        return self._read("unserved_apps", now=now, alive_since=alive_since, limit=limit)

    async def served_apps(self, *, alive_since: datetime) -> Any:
        return self._read("served_apps", alive_since=alive_since)

    async def events_after(self, cursor: Any, *, limit: int, snapshot: bool = False) -> Any:
        return [dict(e) for e in self._read("events_after", cursor=cursor, limit=limit)]


def _service(store: FakeReads, cache_for: float = 0.0) -> insights.Insights:
    # FakeReads answers only the reads these tests make, not the whole InsightsStore.
    return insights.Insights(cast(Any, store), cache_for=cache_for)


def _count(app: str, status: str, count: int) -> base.TaskCount:
    return {"app": app, "status": status, "count": count}


def _worker(apps: list[str], *, heard: timedelta, stopped: bool = False) -> dict[str, Any]:
    return {
        "id": "-".join(apps),
        "apps": apps,
        "heartbeat_at": NOW - heard,
        "stopped_at": NOW if stopped else None,
    }


def test_queue_rows_put_the_counts_and_the_lag_of_each_app_together_in_the_counts_order():
    counts = [
        _count("a", "EXECUTED", 2),
        _count("a", "FINISHED", 7),
        _count("a", "QUEUED", 3),
        _count("b", "FAILED", 1),
        _count("c", "WAITING", 4),
    ]
    rows = insights.queue_rows(counts, [{"app": "a", "lag": 12.5}])
    assert rows == [
        {"app_name": "a", "queued": 3, "running": 2, "waiting": 0, "lag": 12.5},
        {"app_name": "c", "queued": 0, "running": 0, "waiting": 4, "lag": None},
    ]


def test_minute_series_has_one_entry_per_minute_of_the_window_with_zeros_for_quiet_minutes():
    minute = NOW.replace(second=0) - timedelta(minutes=1)
    series = insights.minute_series([{"minute": minute, "finished": 2, "failed": 1}], NOW, 60)
    assert len(series) == 60
    assert series[0]["minute"] == NOW.replace(second=0) - timedelta(minutes=59)
    assert series[-1] == {"minute": NOW.replace(second=0), "finished": 0, "failed": 0}
    assert series[-2] == {"minute": minute, "finished": 2, "failed": 1}


def test_unserved_names_apps_with_queued_tasks_and_no_live_executor_except_debug_queues():
    workers = [
        _worker(["a"], heard=timedelta(seconds=5)),
        _worker(["b"], heard=timedelta(minutes=5)),  # silent too long
        _worker(["c"], heard=timedelta(seconds=5), stopped=True),
    ]
    queued = {"a": 1, "b": 2, "c": 3, "d": 0, "e@debug-x1": 4}
    since = NOW - insights.ALIVE_WITHIN
    assert insights.unserved(queued, workers, alive_since=since) == ["b", "c"]


async def test_status_counts_add_up_the_apps_and_are_ordered_by_status():
    store = FakeReads(
        task_counts=[_count("a", "QUEUED", 1), _count("a", "FAILED", 2), _count("b", "QUEUED", 3)]
    )
    counts = await _service(store).status_counts()
    assert counts == {"FAILED": 2, "QUEUED": 4}
    assert list(counts) == ["FAILED", "QUEUED"]


async def test_health_reports_the_leader_the_live_executors_and_the_unserved_apps():
    store = FakeReads(
        cluster={"leader": False, "executors": 2, "debug_executors": 1, "events": 9},
        unserved_apps=[{"app": "billing", "queued": 3, "waiting_s": 12.3456}],
    )
    health = await _service(store).health(NOW)
    assert health == {
        "database": True,
        "leader": False,
        "executors": 2,
        "status": "degraded",
        "unserved_apps": [{"app": "billing", "queued": 3, "waiting_s": 12.3}],
    }
    assert list(health) == ["database", "leader", "executors", "status", "unserved_apps"]
    assert ("cluster", {"alive_since": NOW - insights.ALIVE_WITHIN}) in store.reads
    assert store.reads[-1][1]["limit"] == insights.HEALTH_UNSERVED


async def test_metrics_and_health_read_the_leader_through_the_same_query():
    store = FakeReads()
    reads = _service(store)
    assert (await reads.health(NOW))["status"] == "ok"
    metrics = await reads.metrics(NOW)
    assert metrics["leader"] is True
    assert [name for name, _ in store.reads].count("cluster") == 2
    assert set(metrics) == {
        "tasks",
        "lag",
        "unserved",
        "executors",
        "debug_executors",
        "leader",
        "events",
    }


async def test_metrics_count_the_queued_tasks_of_apps_no_live_executor_serves():
    store = FakeReads(
        task_counts=[
            _count("billing", "QUEUED", 3),
            _count("orders", "QUEUED", 2),
            _count("orders", "FINISHED", 9),
            _count("shop@debug-0a1b2c3d", "QUEUED", 1),  # emptied by the manager instead
            _count("idle", "FINISHED", 4),
        ],
        served_apps={"orders"},
    )
    metrics = await _service(store).metrics(NOW)
    assert metrics["unserved"] == [{"app": "billing", "queued": 3}]
    # The queued counts come from the task counts: no second aggregate of the queue.
    assert "unserved_apps" not in [name for name, _ in store.reads]
    assert ("served_apps", {"alive_since": NOW - insights.ALIVE_WITHIN}) in store.reads


async def test_top_adds_the_queued_counts_and_the_apps_no_live_executor_serves():
    store = FakeReads(
        task_counts=[_count("a", "QUEUED", 2), _count("b", "QUEUED", 1), _count("b", "FAILED", 1)],
        workers=[_worker(["a"], heard=timedelta(seconds=1))],
    )
    top = await _service(store).top(NOW, heard_since=NOW - timedelta(minutes=10), limit=5)
    assert top["queued"] == {"a": 2, "b": 1}
    assert top["unserved"] == ["b"]
    assert ("active_tasks", {"limit": 5}) in store.reads


async def test_events_after_hands_each_event_on_with_the_cursor_that_resumes_after_it():
    store = FakeReads(
        events_after=[{"id": 4, "xid": "100", "type": "a"}, {"id": 3, "xid": "101", "type": "b"}]
    )
    events = await _service(store).events_after(None, limit=10)
    assert events == [(("100", 4), {"id": 4, "type": "a"}), (("101", 3), {"id": 3, "type": "b"})]


async def test_figures_are_read_every_time_unless_a_cache_is_asked_for():
    store = FakeReads(task_counts=[_count("a", "QUEUED", 1)])
    uncached = _service(store)
    await uncached.status_counts()
    await uncached.queues(NOW)
    assert [name for name, _ in store.reads].count("task_counts") == 2
    store.reads.clear()
    cached = _service(store, cache_for=60)
    await cached.status_counts()
    queues = await cached.queues(NOW)
    await cached.throughput(NOW)
    await cached.throughput(NOW)
    assert [name for name, _ in store.reads] == ["task_counts", "queue_lag", "throughput"]
    assert queues == [{"app_name": "a", "queued": 1, "running": 0, "waiting": 0, "lag": None}]
