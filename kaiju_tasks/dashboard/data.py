"""What the dashboard reads besides TaskService: timelines, throughput, queues, workers, sessions.

Each read is one statement with bound parameters. Task rows themselves always go through
:class:`~kaiju_tasks.service.TaskService`, so the dashboard sees exactly what its caller may see;
this module only reads events, executors and aggregate counts, and filters events by the tasks
the caller may see. The one exception is :meth:`DashboardData.raw_task`, the stored JSON of a
task as text, read only after TaskService has said the caller may see that task.

Sessions live in the ``dashboard_sessions`` table (migration 0012), so they survive restarts and
are shared by every server process on the database. Only a SHA-256 of a session id is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
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
       e.debug,
       coalesce((SELECT array_agg(t.id ORDER BY t.status_change) FROM tasks t
                 WHERE t.status = 'EXECUTED' AND t.executor_id = e.id), '{}') AS running
FROM executors e
WHERE e.heartbeat_at > $1 OR e.stopped_at > $1
ORDER BY e.stopped_at IS NOT NULL, e.started DESC
LIMIT $2
"""


# The stored JSON of one task, as text: what the page shows when it cannot format the task.
_RAW_TASK = """
SELECT id, app_name, status, stage, stages, user_id, created, status_change,
       left(commands::text, $2) AS commands, length(commands::text) AS commands_chars,
       left(kws::text, $2) AS kws, length(kws::text) AS kws_chars,
       left(result::text, $2) AS result, length(result::text) AS result_chars,
       left(error::text, $2) AS error, length(error::text) AS error_chars
FROM tasks
WHERE id = $1
"""

# A new session ($1: hash of its id) for the active token whose hash is $2; nothing if the token
# is unknown or revoked.
_SESSION_START = """
INSERT INTO dashboard_sessions (id_hash, token_id, created, expires)
SELECT $1, t.id, $3, $4 FROM tokens t WHERE t.token_hash = $2 AND t.revoked_at IS NULL
RETURNING token_id
"""

# Keep the newest $2 sessions of token $1; the older ones end.
_SESSION_TRIM = """
DELETE FROM dashboard_sessions
WHERE id_hash IN (
    SELECT id_hash FROM dashboard_sessions WHERE token_id = $1
    ORDER BY created DESC, id_hash
    OFFSET $2
)
"""

# Sessions that have ended ($1 = now, $2 = the longest a session may last): idle too long, too
# old, or of a revoked token.
_SESSION_PRUNE = """
DELETE FROM dashboard_sessions s
WHERE s.expires <= $1
   OR s.created <= $1 - $2::interval
   OR EXISTS (SELECT 1 FROM tokens t WHERE t.id = s.token_id AND t.revoked_at IS NOT NULL)
"""

# The caller a live session ($1: hash of its id) stands for at $2; a session used again after
# more than $5 of quiet is extended to $2 + $3 (idle expiry). $4: the longest a session lasts.
_SESSION_FIND = """
WITH found AS (
    SELECT s.id_hash, s.token_id, s.expires, t.user_id, t.permissions
    FROM dashboard_sessions s
    JOIN tokens t ON t.id = s.token_id
    WHERE s.id_hash = $1
      AND s.expires > $2
      AND s.created > $2 - $4::interval
      AND t.revoked_at IS NULL
), touched AS (
    UPDATE dashboard_sessions s SET expires = $2 + $3::interval
    FROM found
    WHERE s.id_hash = found.id_hash AND found.expires < $2 + $3::interval - $5::interval
)
SELECT token_id, user_id, permissions FROM found
"""

_SESSION_END = """
DELETE FROM dashboard_sessions WHERE id_hash = $1
"""

SESSION_IDLE = timedelta(hours=12)
"""A session ends after this long without a request."""
SESSION_LIFETIME = timedelta(days=7)
"""A session ends this long after the login, however busy."""
SESSIONS_PER_TOKEN = 20
"""Sessions kept per API token; a new login beyond this ends the oldest."""
SESSION_TOUCH = timedelta(minutes=1)
"""How stale a session's expiry may get before a request extends it (one write per minute)."""


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


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

    async def raw_task(self, task_id: str, chars: int) -> dict[str, Any] | None:
        """A task's facts and its JSON columns as stored text (each cut to ``chars``).

        For a page that cannot format the task's content. The caller's right to see the task
        is checked by TaskService before this is called.
        """
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(_RAW_TASK, task_id, chars)
        return None if row is None else dict(row)

    async def start_session(self, session_id: str, token: str, *, now: datetime) -> bool:
        """Store a session for an active API token; False if the token is not (or no longer) one.

        Also ends the token's oldest sessions beyond ``SESSIONS_PER_TOKEN`` and prunes every
        ended session.
        """
        # tokens.token_hash is the token's SHA-256 (migration 0003), as kaiju_tasks.service keeps.
        async with self.pool.acquire() as connection, connection.transaction():
            token_id = await connection.fetchval(
                _SESSION_START, _digest(session_id), _digest(token), now, now + SESSION_IDLE
            )
            if token_id is None:
                return False
            await connection.execute(_SESSION_TRIM, token_id, SESSIONS_PER_TOKEN)
            await connection.execute(_SESSION_PRUNE, now, SESSION_LIFETIME)
        return True

    async def session(self, session_id: str, *, now: datetime) -> dict[str, Any] | None:
        """The ``token_id``, ``user_id`` and ``permissions`` of a live session, or None."""
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(
                _SESSION_FIND,
                _digest(session_id),
                now,
                SESSION_IDLE,
                SESSION_LIFETIME,
                SESSION_TOUCH,
            )
        return None if row is None else dict(row)

    async def end_session(self, session_id: str) -> None:
        """Delete a session (log out): its cookie no longer logs anyone in."""
        async with self.pool.acquire() as connection:
            await connection.execute(_SESSION_END, _digest(session_id))

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
