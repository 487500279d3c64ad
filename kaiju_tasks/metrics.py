"""Prometheus metrics (``GET /metrics``), from the database and the live event stream.

Gauges are read from PostgreSQL at each scrape (tasks by status and app, the age of the oldest
QUEUED task by app, QUEUED tasks of apps no live executor serves, live executors, events
written); the stage duration histogram by method is
fed by an EventReceiver from the events executors write, counted since this process started.

``kaiju_tasks_tasks_ended_total{app,status}`` counts task runs that ended (FINISHED, FAILED),
from the events table: the first scrape counts every ended run whose event is still kept, each
later scrape adds the runs whose events were written since (by the cursor of ``events_after``,
so none is counted twice or missed). Garbage collection deletes old tasks and events without
lowering it, and a cron task counts once per run. Two processes agree unless events were
pruned between their first scrapes (the later one then counts those fewer).

Label sets are bounded, so that no number of distinct apps or methods can grow a scrape:

- ``app``: the :data:`MAX_APPS` apps with the most tasks keep their own label; the others are
  added up under :data:`OTHER` (their counts summed, their queue lag the oldest of theirs);
- ``app`` of ``kaiju_tasks_tasks_ended_total``: the first :data:`MAX_APPS` apps counted keep
  their own label (the first scrape takes those with the most ended runs); later ones, and runs
  of tasks deleted before they were counted, count under :data:`OTHER`;
- ``method``: the first :data:`MAX_METHODS` methods seen since start keep their own label; later
  ones are observed under :data:`OTHER`. A method is the one *as written* in the task (a
  template's source, never what it rendered to), so no user data reaches a label;
- a label value is at most :data:`LABEL_CHARS` characters: a longer one is cut and ends with
  ``…`` and a short digest of the whole, so two long names stay two labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kaiju_tasks import clock as clock_
from kaiju_tasks import insights, monitor
from kaiju_tasks.store import base

STAGE_EVENTS = frozenset(
    {"task-stage-succeeded", "task-succeeded", "task-failed", "task-retried", "task-rejected"}
)
MAX_APPS: Final = 100
"""Most ``app`` label values of the by-app gauges, besides :data:`OTHER`."""
MAX_METHODS: Final = 100
"""Most ``method`` label values of the stage duration histogram, besides :data:`OTHER`."""
OTHER: Final = "other"
"""The label value that stands for every app or method past the bound (an app really named
``other`` is counted there too)."""
LABEL_CHARS: Final = 128
"""Longest label value (characters); a longer one is cut (see the module docstring)."""
SKIPPED: Final = "(skipped)"
"""The method label of a stage skipped by its condition (no method was called)."""


def label(value: str) -> str:
    """``value`` as a label value: at most :data:`LABEL_CHARS` characters."""
    if len(value) <= LABEL_CHARS:
        return value
    digest = hashlib.blake2b(value.encode(errors="surrogatepass"), digest_size=4).hexdigest()
    return f"{value[: LABEL_CHARS - len(digest) - 2]}…#{digest}"


def top_apps(rows: Iterable[dict[str, Any]], limit: int = MAX_APPS) -> dict[str, str]:
    """App name -> its ``app`` label, from rows of ``{"app", "count"}``.

    The ``limit`` apps with the most tasks keep their name (ties go to the name first in order);
    the rest, and an app named :data:`OTHER`, map to :data:`OTHER`.
    """
    totals: dict[str, int] = {}
    for row in rows:
        totals[row["app"]] = totals.get(row["app"], 0) + int(row["count"])
    ranked = sorted(
        (app for app in totals if label(app) != OTHER), key=lambda app: (-totals[app], app)
    )
    kept = {app: label(app) for app in ranked[:limit]}
    return {app: kept.get(app, OTHER) for app in totals}


class _Snapshot(Collector):
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def collect(self) -> Iterator[Any]:
        rows = self.data.get("tasks", [])
        labels = top_apps(rows)
        counts: dict[tuple[str, str], int] = {}
        for item in rows:
            key = (labels[item["app"]], item["status"])
            counts[key] = counts.get(key, 0) + int(item["count"])
        tasks = GaugeMetricFamily(
            "kaiju_tasks_tasks", "Tasks by app and status", labels=["app", "status"]
        )
        for (app, status), count in counts.items():
            tasks.add_metric([app, status], count)
        yield tasks
        lags: dict[str, float] = {}
        for item in self.data.get("lag", []):
            app = labels.get(item["app"], OTHER)
            lags[app] = max(lags.get(app, 0.0), float(item["lag"]), 0.0)
        lag = GaugeMetricFamily(
            "kaiju_tasks_queue_lag_seconds", "Age of the oldest QUEUED task by app", labels=["app"]
        )
        for app, seconds in lags.items():
            lag.add_metric([app], seconds)
        yield lag
        unserved: dict[str, int] = {}
        for item in self.data.get("unserved", []):
            app = labels.get(item["app"], OTHER)
            unserved[app] = unserved.get(app, 0) + int(item["queued"])
        gauge = GaugeMetricFamily(
            "kaiju_tasks_unserved_tasks",
            "QUEUED tasks of apps that no live executor serves (they wait, then time out)",
            labels=["app"],
        )
        for app, count in unserved.items():
            gauge.add_metric([app], count)
        yield gauge
        yield GaugeMetricFamily(
            "kaiju_tasks_executors_alive",
            "Executors heard from lately",
            value=self.data.get("executors", 0),
        )
        yield GaugeMetricFamily(
            "kaiju_tasks_leader",
            "1 while a manager leads this database (timers, retries, cron, deadlines and"
            " rescues run only then), else 0",
            value=1 if self.data.get("leader") else 0,
        )
        yield GaugeMetricFamily(
            "kaiju_tasks_debug_executors_alive",
            "Debug executors heard from lately (counted in kaiju_tasks_executors_alive too);"
            " they serve private <app>@debug-<random> queues only",
            value=self.data.get("debug_executors", 0),
        )
        yield CounterMetricFamily(
            "kaiju_tasks_events_written",
            "Lifecycle events written",
            value=self.data.get("events", 0),
        )
        ended = CounterMetricFamily(
            "kaiju_tasks_tasks_ended",
            "Task runs that ended, by app and status (FINISHED; FAILED: failed, revoked or"
            " rejected), from the events table; garbage collection never lowers it",
            labels=["app", "status"],
        )
        for (app, status), count in sorted(self.data.get("ended", {}).items()):
            ended.add_metric([app, status], count)
        yield ended


class EndedTotals:
    """Task runs ended by (app label, status), added up from :meth:`Insights.ended_after`.

    Only ever grows: each read adds the runs ended after the cursor of the last one.
    """

    def __init__(self) -> None:
        self.cursor: base.EventCursor | None = None
        self.totals: dict[tuple[str, str], int] = {}
        self._apps: set[str] = set()
        self._lock = asyncio.Lock()

    def add(self, rows: Iterable[insights.EndedCount]) -> None:
        """Add rows of ``{app, status, count}`` (the most first, for the label bound)."""
        for row in rows:
            key = (self._app_label(row["app"]), row["status"])
            self.totals[key] = self.totals.get(key, 0) + int(row["count"])

    def _app_label(self, app: str | None) -> str:
        if app is None:
            return OTHER
        value = label(app)
        if value == OTHER or value in self._apps:
            return value
        if len(self._apps) >= MAX_APPS:
            return OTHER
        self._apps.add(value)
        return value

    async def read(self, reads: insights.Insights) -> dict[tuple[str, str], int]:
        """Add what ended since the last read; the totals (one read at a time)."""
        async with self._lock:
            cursor, rows = await reads.ended_after(self.cursor)
            self.add(rows)
            self.cursor = cursor
            return dict(self.totals)


class Metrics:
    """The /metrics registry; ``start()`` follows events for the stage duration histogram."""

    def __init__(
        self, store: base.InsightsStore, dsn: str, clock: clock_.Clock | None = None
    ) -> None:
        self.store = store
        self.insights = insights.Insights(store)
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
        self.retries = Counter(
            "kaiju_tasks_task_retries",
            "Failed runs that will be retried, by the method of the stage that failed",
            ["method"],
            registry=self.registry,
        )
        self._methods: set[str] = set()
        """The method labels given so far (at most :data:`MAX_METHODS`)."""
        self.ended = EndedTotals()
        self._receiver = monitor.EventReceiver(dsn, {"*": self.event})
        self._task: asyncio.Task[int] | None = None

    def event(self, event: monitor.Event) -> None:
        """Count one lifecycle event (stage durations, retries)."""
        data = event.get("data") or {}
        if event["type"] == "task-retried":
            self.retries.labels(self._method_label(data.get("method"))).inc()
        if event["type"] in STAGE_EVENTS and data.get("duration_s") is not None:
            method = data.get("method")
            self.stage_duration.labels(self._method_label(method)).observe(
                float(data["duration_s"])
            )

    def _method_label(self, method: Any) -> str:
        value = label(method) if isinstance(method, str) and method else SKIPPED
        if value == OTHER or value in self._methods:
            return value
        if len(self._methods) >= MAX_METHODS:
            return OTHER
        self._methods.add(value)
        return value

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
        data = await self.insights.metrics(self.clock.now())
        data["ended"] = await self.ended.read(self.insights)
        self._snapshot.data = data
        return generate_latest(self.registry)
