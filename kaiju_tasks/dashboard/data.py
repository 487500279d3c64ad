"""What the dashboard reads besides TaskService: timelines, throughput, queues, workers.

Each read is one statement with bound parameters. Task rows themselves always go through
:class:`~kaiju_tasks.service.TaskService`, so the dashboard sees exactly what its caller may see;
this module only reads events, executors and aggregate counts, and filters events by the tasks
the caller may see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from kaiju_tasks import monitor
from kaiju_tasks.store import postgres

logger = logging.getLogger(__name__)

TIMELINE_LIMIT = 500  # the newest events shown on a task page
CHART_MINUTES = 60
CLOCK_SKEW = timedelta(minutes=5)  # how far behind another host's clock may be
CLOSE_WITHIN = 5.0  # seconds the event follower gets to stop with the server

# The newest $2 events of a task, shown oldest first (a cron task's early runs drop off first).
_TIMELINE = """
SELECT * FROM (
    SELECT e.id, e.type, e.status, e.stage, e.executor_id, e.created, e.data
    FROM events e
    WHERE e.task_id = $1 AND e.created >= $3
    ORDER BY e.id DESC
    LIMIT $2
) newest
ORDER BY id
"""

# Finished and failed tasks per minute over the last hour ($1 = now), from the events table.
_THROUGHPUT = """
SELECT date_trunc('minute', created) AS minute,
       count(*) FILTER (WHERE type = 'task-succeeded') AS finished,
       count(*) FILTER (WHERE type IN ('task-failed', 'task-revoked', 'task-rejected')) AS failed
FROM events
WHERE created > date_trunc('minute', $1::timestamptz) - make_interval(mins => $2 - 1)
  AND created <= $1::timestamptz
  AND type IN ('task-succeeded', 'task-failed', 'task-revoked', 'task-rejected')
GROUP BY 1
ORDER BY 1
"""

# Queue depth per app: QUEUED tasks and the age of the oldest ($1 = now); also what waits.
_QUEUES = """
SELECT app_name,
       count(*) FILTER (WHERE status = 'QUEUED') AS queued,
       count(*) FILTER (WHERE status = 'EXECUTED') AS running,
       count(*) FILTER (WHERE status = 'WAITING') AS waiting,
       extract(epoch FROM $1::timestamptz
               - min(queued_at) FILTER (WHERE status = 'QUEUED'))::float8 AS lag
FROM tasks
WHERE status IN ('QUEUED', 'EXECUTED', 'WAITING')
GROUP BY 1
ORDER BY 1
"""

_STATUS_COUNTS = """
SELECT status, count(*) AS n FROM tasks GROUP BY 1 ORDER BY 1
"""

# Executors heard from since $1 (newest first), each with the tasks it runs now.
_WORKERS = """
SELECT e.id, e.host, e.pid, e.apps, e.concurrency, e.started, e.heartbeat_at, e.stopped_at,
       coalesce((SELECT array_agg(t.id ORDER BY t.status_change) FROM tasks t
                 WHERE t.status = 'EXECUTED' AND t.executor_id = e.id), '{}') AS running
FROM executors e
WHERE e.heartbeat_at > $1 OR e.stopped_at > $1
ORDER BY e.stopped_at IS NOT NULL, e.started DESC
LIMIT $2
"""


class DashboardData:
    """Reads for the dashboard's pages, on an asyncpg pool with the JSON codecs.

    The cluster-wide figures of the overview (counts, queues, throughput) are kept for
    ``cache_for`` seconds: every open overview refreshes on every burst of events, and these
    aggregate the whole tasks table.
    """

    def __init__(
        self, pool: asyncpg.Pool, dsn: str | None = None, *, cache_for: float = 2.0
    ) -> None:
        self.pool = pool
        self.store = postgres.PostgresTaskStore(pool)
        self.dsn = dsn
        self.hub = EventHub(dsn) if dsn else None
        self.cache_for = cache_for
        self._cache: dict[str, tuple[float, Any]] = {}

    async def _cached(self, key: str, read: Callable[[], Awaitable[Any]]) -> Any:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.cache_for:
            return hit[1]
        value = await read()
        # Drop what has expired, so keys that change (the throughput's minute) never pile up.
        self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self.cache_for}
        self._cache[key] = (now, value)
        return value

    async def timeline(self, task_id: str, since: datetime | str) -> list[dict[str, Any]]:
        """The newest ``TIMELINE_LIMIT`` events of one task written since ``since``."""
        if isinstance(since, str):
            since = datetime.fromisoformat(since)
        since -= CLOCK_SKEW  # events are stamped by the clocks of other processes and hosts
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(_TIMELINE, task_id, TIMELINE_LIMIT, since)
        return [dict(r) for r in rows]

    async def throughput(self, now: datetime, minutes: int = CHART_MINUTES) -> list[dict[str, Any]]:
        """Finished and failed per minute, one entry per minute of the window (zeros included)."""

        async def read() -> list[Any]:
            async with self.pool.acquire() as connection:
                return list(await connection.fetch(_THROUGHPUT, now, minutes))

        rows = await self._cached(f"throughput:{minutes}:{now:%Y%m%d%H%M}", read)
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

    async def owner(self, task_id: str) -> str | None:
        """The user who owns a task (None: a system task, or no such task)."""
        return (await self.store.task_owners([task_id])).get(task_id)

    async def queues(self, now: datetime) -> list[dict[str, Any]]:
        """Per app: QUEUED, EXECUTED and WAITING counts and the oldest QUEUED task's age."""

        async def read() -> list[dict[str, Any]]:
            async with self.pool.acquire() as connection:
                return [dict(r) for r in await connection.fetch(_QUEUES, now)]

        queues: list[dict[str, Any]] = await self._cached("queues", read)
        return queues

    async def status_counts(self) -> dict[str, int]:
        """Tasks by status."""

        async def read() -> dict[str, int]:
            async with self.pool.acquire() as connection:
                return {r["status"]: r["n"] for r in await connection.fetch(_STATUS_COUNTS)}

        counts: dict[str, int] = await self._cached("counts", read)
        return counts

    async def workers(self, heard_since: datetime, limit: int = 200) -> list[dict[str, Any]]:
        """Executors heard from (or stopped) since ``heard_since``, live ones first."""
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(_WORKERS, heard_since, limit)
        return [dict(r) for r in rows]

    async def close(self) -> None:
        """Stop the live event follower, if it runs."""
        if self.hub is not None:
            await self.hub.close()


class EventHub:
    """One EventReceiver per server, fanned out to every open live-update stream.

    The receiver starts with the server and follows from "now"; each subscriber
    gets a bounded queue, and a subscriber too slow to keep up loses events rather than
    holding memory (its page then refreshes on the next event anyway).
    """

    QUEUE_SIZE = 1000

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._subscribers: set[asyncio.Queue[monitor.Event | None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.receiver: monitor.EventReceiver | None = None

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[monitor.Event | None]]:
        """A queue of events from now on, for as long as the context lasts (None: closing)."""
        queue: asyncio.Queue[monitor.Event | None] = asyncio.Queue(self.QUEUE_SIZE)
        self._subscribers.add(queue)
        self.start()
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def start(self) -> None:
        """Follow events from now on.

        The server starts this with itself, so that a page rendered before its stream connected
        misses nothing: it refreshes once connected, and every later event reaches it.
        """
        if not self._closed and (self._task is None or self._task.done()):
            self.receiver = monitor.EventReceiver(self.dsn, poll_interval=timedelta(seconds=1))
            self._task = asyncio.create_task(self._follow(), name="kaiju-tasks-dashboard-events")

    async def _follow(self) -> None:
        receiver = self.receiver
        assert receiver is not None
        while True:
            try:
                async for event in receiver:
                    for queue in list(self._subscribers):
                        with contextlib.suppress(asyncio.QueueFull):
                            queue.put_nowait(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database went away: try again
                logger.warning(
                    "Dashboard event stream failed; retrying",
                    extra={"event": "dashboard_events_failed", "error": str(exc)},
                )
                await asyncio.sleep(1)

    async def close(self) -> None:
        """Stop following events and tell every subscriber (with None) that it ends."""
        self._closed = True
        for queue in list(self._subscribers):
            while not queue.empty():  # make room: the end matters more than what it missed
                queue.get_nowait()
            queue.put_nowait(None)
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=CLOSE_WITHIN)
            if not done:
                logger.warning(
                    "Dashboard event follower did not stop in time",
                    extra={"event": "dashboard_events_stuck"},
                )
            self._task = None
