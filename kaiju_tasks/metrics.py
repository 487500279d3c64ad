"""Prometheus metrics (``GET /metrics``), from the database and the live event stream.

Gauges are read from PostgreSQL at each scrape (tasks by status and app, the age of the oldest
QUEUED task by app, live executors, events written); the stage duration histogram by method is
fed by an EventReceiver from the events executors write, counted since this process started.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kaiju_tasks import clock as clock_
from kaiju_tasks import monitor
from kaiju_tasks.store import postgres

ALIVE_WITHIN = timedelta(seconds=60)
"""An executor heard from within this long counts as alive (metrics, /health, ``top``)."""
STAGE_EVENTS = frozenset(
    {"task-stage-succeeded", "task-succeeded", "task-failed", "task-retried", "task-rejected"}
)


class _Snapshot(Collector):
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def collect(self) -> Iterator[Any]:
        tasks = GaugeMetricFamily(
            "kaiju_tasks_tasks", "Tasks by app and status", labels=["app", "status"]
        )
        for item in self.data.get("tasks", []):
            tasks.add_metric([item["app"], item["status"]], item["count"])
        yield tasks
        lag = GaugeMetricFamily(
            "kaiju_tasks_queue_lag_seconds", "Age of the oldest QUEUED task by app", labels=["app"]
        )
        for item in self.data.get("lag", []):
            lag.add_metric([item["app"]], max(item["lag"], 0.0))
        yield lag
        yield GaugeMetricFamily(
            "kaiju_tasks_executors_alive",
            "Executors heard from lately",
            value=self.data.get("executors", 0),
        )
        yield CounterMetricFamily(
            "kaiju_tasks_events_written",
            "Lifecycle events written",
            value=self.data.get("events", 0),
        )


class Metrics:
    """The /metrics registry; ``start()`` follows events for the stage duration histogram."""

    def __init__(
        self, store: postgres.PostgresTaskStore, dsn: str, clock: clock_.Clock | None = None
    ) -> None:
        self.store = store
        self.dsn = dsn
        self.clock: clock_.Clock = clock or clock_.SystemClock()
        self.registry = CollectorRegistry()
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)
        self.stage_duration = Histogram(
            "kaiju_tasks_stage_duration_seconds",
            "Stage call durations by method",
            ["method"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60, 300, 3600),
        )
        self._receiver = monitor.EventReceiver(dsn, {"*": self.event})
        self._task: asyncio.Task[int] | None = None

    def event(self, event: monitor.Event) -> None:
        """Count one lifecycle event (stage durations)."""
        data = event.get("data") or {}
        if event["type"] in STAGE_EVENTS and data.get("duration_s") is not None:
            method = data.get("method") or "(skipped)"
            self.stage_duration.labels(method).observe(float(data["duration_s"]))

    async def start(self) -> None:
        """Follow events from now on."""
        self._task = asyncio.create_task(self._receiver.capture())

    async def stop(self) -> None:
        """Stop following events."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        now = self.clock.now()
        row = await self.store.metrics(now=now, alive_since=now - ALIVE_WITHIN)
        self._snapshot.data = {
            "tasks": _json(row["tasks"]),
            "lag": _json(row["lag"]),
            "executors": row["executors"],
            "events": row["events"],
        }
        return generate_latest(self.registry)


def _json(value: Any) -> Any:
    import orjson

    return orjson.loads(value) if isinstance(value, str | bytes) else value
