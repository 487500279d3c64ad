"""What the dashboard reads besides TaskService: timelines, throughput, queues, workers, sessions.

The figures come from :class:`kaiju_tasks.insights.Insights`, the read side that ``/metrics``,
``/health`` and ``top`` use too. Task rows themselves always go through
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
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any, cast

from kaiju_tasks import insights, monitor, redact
from kaiju_tasks.store import base

logger = logging.getLogger(__name__)

TIMELINE_LIMIT = 500  # the newest events shown on a task page
CHART_MINUTES = insights.CHART_MINUTES
CLOCK_SKEW = timedelta(minutes=5)  # how far behind another host's clock may be
CLOSE_WITHIN = 5.0  # seconds the event follower gets to stop with the server

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

    def __init__(self, pool: Any, dsn: str | None = None, *, cache_for: float = 2.0) -> None:
        self.pool = pool
        self.store = insights.postgres_store(pool)
        self.sessions: base.SessionStore = self.store
        self.insights = insights.Insights(self.store, cache_for=cache_for)
        self.dsn = dsn
        self.hub = EventHub(dsn) if dsn else None

    async def timeline(self, task_id: str, since: datetime | str) -> list[dict[str, Any]]:
        """The newest ``TIMELINE_LIMIT`` events of one task written since ``since``."""
        if isinstance(since, str):
            since = datetime.fromisoformat(since)
        since -= CLOCK_SKEW  # events are stamped by the clocks of other processes and hosts
        rows = await self.insights.timeline(task_id, since=since, limit=TIMELINE_LIMIT)
        return cast(list[dict[str, Any]], rows)

    async def throughput(self, now: datetime, minutes: int = CHART_MINUTES) -> list[dict[str, Any]]:
        """Finished and failed per minute, one entry per minute of the window (zeros included)."""
        return await self.insights.throughput(now, minutes)

    async def owner(self, task_id: str) -> str | None:
        """The user who owns a task (None: a system task, or no such task)."""
        return (await self.store.task_owners([task_id])).get(task_id)

    async def queues(self, now: datetime) -> list[dict[str, Any]]:
        """Per app: QUEUED, EXECUTED and WAITING counts and the oldest QUEUED task's age."""
        return await self.insights.queues(now)

    async def status_counts(self) -> dict[str, int]:
        """Tasks by status."""
        return await self.insights.status_counts()

    async def workers(
        self, heard_since: datetime, limit: int = insights.WORKERS_LIMIT
    ) -> list[dict[str, Any]]:
        """Executors heard from (or stopped) since ``heard_since``, live ones first."""
        return cast(list[dict[str, Any]], await self.insights.workers(heard_since, limit))

    async def raw_task(self, task_id: str, chars: int) -> dict[str, Any] | None:
        """A task's facts and its JSON columns as stored text (each cut to ``chars``).

        For a page that cannot format the task's content. The caller's right to see the task
        is checked by TaskService before this is called.
        """
        return cast(dict[str, Any] | None, await self.insights.raw_task(task_id, chars))

    async def start_session(self, session_id: str, token: str, *, now: datetime) -> bool:
        """Store a session for an active API token; False if the token is not (or no longer) one.

        Also ends the token's oldest sessions beyond ``SESSIONS_PER_TOKEN`` and prunes every
        ended session.
        """
        # tokens.token_hash is the token's SHA-256 (migration 0003), as kaiju_tasks.service keeps.
        return await self.sessions.start_session(
            _digest(session_id),
            _digest(token),
            now=now,
            expires=now + SESSION_IDLE,
            keep=SESSIONS_PER_TOKEN,
            lifetime=SESSION_LIFETIME,
        )

    async def session(self, session_id: str, *, now: datetime) -> dict[str, Any] | None:
        """The ``token_id``, ``user_id`` and ``permissions`` of a live session, or None."""
        row = await self.sessions.find_session(
            _digest(session_id),
            now=now,
            idle=SESSION_IDLE,
            lifetime=SESSION_LIFETIME,
            touch=SESSION_TOUCH,
        )
        return cast(dict[str, Any] | None, row)

    async def end_session(self, session_id: str) -> None:
        """Delete a session (log out): its cookie no longer logs anyone in."""
        await self.sessions.end_session(_digest(session_id))

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
                    extra={"event": "dashboard_events_failed", "error": redact.text(str(exc))},
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
