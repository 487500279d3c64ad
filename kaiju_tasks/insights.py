"""The read side: one service over the InsightsStore for everything that watches the cluster.

The dashboard (``dashboard/data.py``), ``/metrics`` (``metrics.py``), ``/health`` (``wiring.py``),
``kaiju-tasks top`` (``cli/watch.py``), the event receiver and ``State.rebuild`` (``monitor.py``)
all read through :class:`Insights`, so each figure is read by one query and combined in one place:

- counts by app and status (``task_counts``): /metrics' ``kaiju_tasks_tasks``, the overview's
  counts by status and queue depths, ``top``'s table;
- queue lag (``queue_lag``): /metrics' ``kaiju_tasks_queue_lag_seconds``, the overview's queues;
- leader and live executors (``cluster``): /health and /metrics;
- executors (``workers``): the workers page, the overview and ``top``;
- apps no live executor serves (``unserved_apps``): /health and /metrics; views that read the
  queue and the executors already use the pure :func:`unserved`;
- task runs ended by app and status after an event cursor (``ended_after``): /metrics'
  ``kaiju_tasks_tasks_ended_total``, which adds them up.

Time comes in as ``now``; this module reads no clock but the loop's monotonic one, for its cache.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, cast

from kaiju_tasks import defaults, models
from kaiju_tasks.store import base, opening

Event = dict[str, Any]
"""A lifecycle event as receivers hand it on (see ``events_after`` in ``store/queries.sql``)."""

ALIVE_WITHIN = defaults.ALIVE_WITHIN
"""An executor heard from within this long counts as alive (see :data:`defaults.ALIVE_WITHIN`)."""
HEALTH_UNSERVED = 20
"""Most apps ``/health`` lists under ``unserved_apps``."""
CHART_MINUTES = 60
"""Minutes of the overview's throughput chart."""
WORKERS_LIMIT = 200
"""Most executors a listing of executors returns by default."""


EndedCount = base.EndedCount
"""Task runs of an app that ended in a status (see :class:`kaiju_tasks.store.base.EndedCount`)."""


# -- opening the store ------------------------------------------------------------------------

postgres_store = opening.store_on
"""The PostgreSQL store on an asyncpg pool (see :mod:`kaiju_tasks.store.opening`)."""
connect = opening.connect
"""A store on a pool of its own, for public APIs handed a DSN (event receivers)."""


# -- pure -------------------------------------------------------------------------------------


def alive(worker: Mapping[str, Any], *, alive_since: datetime) -> bool:
    """Whether an executor row (``stopped_at``, ``heartbeat_at``) counts as live."""
    heartbeat = worker.get("heartbeat_at")
    if isinstance(heartbeat, str):
        heartbeat = datetime.fromisoformat(heartbeat)
    return worker.get("stopped_at") is None and heartbeat is not None and heartbeat > alive_since


def unserved(
    queued: Mapping[str, int], workers: Iterable[Mapping[str, Any]], *, alive_since: datetime
) -> list[str]:
    """Apps with queued tasks (``app -> count``) that no live executor among ``workers`` serves.

    The pure form of :meth:`Insights.unserved_apps`, for views that read the queue and the
    executors already (``kaiju-tasks top``, the dashboard's overview). Sorted by name.
    """
    served = {
        app for w in workers if alive(w, alive_since=alive_since) for app in w.get("apps") or ()
    }
    return sorted(
        app
        for app, count in queued.items()
        if count and app not in served and models.DEBUG_MARK not in app
    )


def queue_rows(
    counts: Iterable[base.TaskCount], lags: Iterable[base.QueueLag]
) -> list[dict[str, Any]]:
    """Per app with tasks QUEUED, EXECUTED or WAITING: those counts and the queue's lag.

    Each row is ``{app_name, queued, running, waiting, lag}`` (``lag`` None when nothing is
    queued), in the order of ``counts``.
    """
    lag = {row["app"]: row["lag"] for row in lags}
    rows: dict[str, dict[str, Any]] = {}
    column = {"QUEUED": "queued", "EXECUTED": "running", "WAITING": "waiting"}
    for row in counts:
        name = column.get(row["status"])
        if name is None:
            continue
        app = row["app"]
        if app not in rows:
            rows[app] = {"app_name": app, "queued": 0, "running": 0, "waiting": 0}
            rows[app]["lag"] = lag.get(app)
        rows[app][name] += row["count"]
    return list(rows.values())


def minute_series(
    rows: Iterable[base.MinuteCount], now: datetime, minutes: int
) -> list[dict[str, Any]]:
    """One ``{minute, finished, failed}`` per minute of the window up to ``now``, zeros included."""
    counted = {r["minute"]: r for r in rows}
    end = now.replace(second=0, microsecond=0)
    series = []
    for back in range(minutes - 1, -1, -1):
        minute = end - timedelta(minutes=back)
        row = counted.get(minute)
        series.append(
            {
                "minute": minute,
                "finished": row["finished"] if row else 0,
                "failed": row["failed"] if row else 0,
            }
        )
    return series


# -- the service ------------------------------------------------------------------------------


class Insights:
    """The monitoring reads over an :class:`~kaiju_tasks.store.base.InsightsStore`.

    Args:
        store: the store to read.
        cache_for: seconds a cluster-wide figure (counts, queue lag, throughput) is kept before
            it is read again; 0 reads every time. The dashboard keeps them a little: every open
            overview refreshes on every burst of events, and these aggregate the tasks table.
    """

    def __init__(self, store: base.InsightsStore, *, cache_for: float = 0.0) -> None:
        self.store = store
        self.cache_for = cache_for
        self._cache: dict[str, tuple[float, Any]] = {}

    async def _cached(self, key: str, read: Callable[[], Awaitable[Any]]) -> Any:
        if self.cache_for <= 0:
            return await read()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.cache_for:
            return hit[1]
        value = await read()
        # Drop what has expired, so keys that change (the throughput's minute) never pile up.
        self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self.cache_for}
        self._cache[key] = (now, value)
        return value

    # -- figures ------------------------------------------------------------------------------

    async def task_counts(self) -> list[base.TaskCount]:
        """Tasks by app and status, ordered by app then status."""
        counts: list[base.TaskCount] = await self._cached("counts", self.store.task_counts)
        return counts

    async def status_counts(self) -> dict[str, int]:
        """Tasks by status, ordered by status."""
        totals: dict[str, int] = {}
        for row in await self.task_counts():
            totals[row["status"]] = totals.get(row["status"], 0) + row["count"]
        return dict(sorted(totals.items()))

    async def queues(self, now: datetime) -> list[dict[str, Any]]:
        """Per app: QUEUED, EXECUTED and WAITING counts and the oldest QUEUED task's age.

        See :func:`queue_rows`.
        """
        lags: list[base.QueueLag] = await self._cached("lag", lambda: self.store.queue_lag(now=now))
        return queue_rows(await self.task_counts(), lags)

    async def throughput(self, now: datetime, minutes: int = CHART_MINUTES) -> list[dict[str, Any]]:
        """Finished and failed per minute, one entry per minute of the window (zeros included)."""
        rows: list[base.MinuteCount] = await self._cached(
            f"throughput:{minutes}:{now:%Y%m%d%H%M}",
            lambda: self.store.throughput(now=now, minutes=minutes),
        )
        return minute_series(rows, now, minutes)

    async def workers(
        self, heard_since: datetime, limit: int | None = WORKERS_LIMIT
    ) -> list[base.ExecutorRow]:
        """Executors heard from (or stopped) since ``heard_since``, live ones first."""
        return await self.store.workers(heard_since=heard_since, limit=limit)

    async def timeline(self, task_id: str, *, since: datetime, limit: int) -> list[base.EventRow]:
        """The newest ``limit`` events of one task written since ``since``, oldest first."""
        return await self.store.timeline(task_id, since=since, limit=limit)

    async def raw_task(self, task_id: str, chars: int) -> base.RawTask | None:
        """A task's facts and its JSON columns as stored text (each cut to ``chars``)."""
        return await self.store.raw_task(task_id, chars=chars)

    async def unserved_apps(
        self, *, now: datetime, alive_since: datetime, limit: int | None
    ) -> list[base.UnservedApp]:
        """Apps whose tasks are QUEUED while no live executor serves them, longest waiting first."""
        return await self.store.unserved_apps(now=now, alive_since=alive_since, limit=limit)

    async def served_apps(self, *, alive_since: datetime) -> set[str]:
        """The apps live executors serve (heard from after ``alive_since`` and not stopped)."""
        return await self.store.served_apps(alive_since=alive_since)

    # -- /health, /metrics, top ---------------------------------------------------------------

    async def health(self, now: datetime) -> dict[str, Any]:
        """What ``/health`` answers: ``{database, leader, executors, status, unserved_apps}``.

        ``status`` is ``ok`` while a manager leads, else ``degraded``; ``unserved_apps`` lists at
        most :data:`HEALTH_UNSERVED` apps no live executor serves.
        """
        alive_since = now - ALIVE_WITHIN
        cluster = await self.store.cluster(alive_since=alive_since)
        unserved_apps = await self.store.unserved_apps(
            now=now, alive_since=alive_since, limit=HEALTH_UNSERVED
        )
        return {
            "database": True,
            "leader": cluster["leader"],
            "executors": cluster["executors"],
            "status": "ok" if cluster["leader"] else "degraded",
            "unserved_apps": [
                {"app": u["app"], "queued": u["queued"], "waiting_s": round(u["waiting_s"], 1)}
                for u in unserved_apps
            ],
        }

    async def metrics(self, now: datetime) -> dict[str, Any]:
        """The figures of ``/metrics``: tasks, lag, unserved apps, executors, leader, events."""
        alive_since = now - ALIVE_WITHIN
        cluster = await self.store.cluster(alive_since=alive_since)
        tasks = await self.task_counts()
        # The QUEUED counts are in the task counts already: only which apps are served is read.
        served = await self.store.served_apps(alive_since=alive_since)
        return {
            "tasks": tasks,
            "lag": await self.store.queue_lag(now=now),
            "unserved": [
                {"app": row["app"], "queued": row["count"]}
                for row in tasks
                if row["status"] == "QUEUED"
                and row["count"]
                and row["app"] not in served
                and models.DEBUG_MARK not in row["app"]
            ],
            "executors": cluster["executors"],
            "debug_executors": cluster["debug_executors"],
            "leader": cluster["leader"],
            "events": cluster["events"],
        }

    async def top(self, now: datetime, *, heard_since: datetime, limit: int) -> dict[str, Any]:
        """What ``kaiju-tasks top`` shows.

        ``workers`` (by id), ``tasks`` running or waiting (at most ``limit``), ``counts`` by app
        and status, ``queued`` (app -> QUEUED tasks) and ``unserved``, the apps with queued tasks
        that no executor alive within :data:`ALIVE_WITHIN` of ``now`` serves.
        """
        snapshot = await self.store.top(heard_since=heard_since, limit=limit)
        queued = {c["app"]: c["count"] for c in snapshot["counts"] if c["status"] == "QUEUED"}
        return {
            **snapshot,
            "queued": queued,
            "unserved": unserved(queued, snapshot["workers"], alive_since=now - ALIVE_WITHIN),
        }

    async def ended_after(
        self, cursor: base.EventCursor | None
    ) -> tuple[base.EventCursor | None, list[EndedCount]]:
        """Task runs that ended after ``cursor`` (None: every kept event), and the next cursor.

        Counted from the events of ended transactions in the order of :meth:`events_after`, so
        that passing the returned cursor back counts each run once; the cursor comes back as
        given when nothing was written since. Never cached.
        """
        return await self.store.ended_counts(cursor)

    # -- events -------------------------------------------------------------------------------

    async def event_cursor(self, event_id: int | None) -> base.EventCursor | None:
        """The cursor after event ``event_id``, or after the newest event when None."""
        return await self.store.event_cursor(event_id)

    async def events_after(
        self, cursor: base.EventCursor | None, *, limit: int, snapshot: bool = False
    ) -> list[tuple[base.EventCursor, Event]]:
        """Events after ``cursor``, each with the cursor that resumes after it.

        ``snapshot=True`` reads every committed event, for a one-off replay that is not
        followed afterwards (following needs the default, which waits for open transactions).
        """
        rows = await self.store.events_after(cursor, limit=limit, snapshot=snapshot)
        return [((row.pop("xid"), row["id"]), cast(Event, row)) for row in rows]
