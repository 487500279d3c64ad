"""The read side in PostgreSQL: the InsightsStore queries, one named query per figure.

``PostgresInsights`` is a base of :class:`~kaiju_tasks.store.postgres.PostgresTaskStore`, so every
PostgreSQL store also answers the monitoring reads; :class:`kaiju_tasks.insights.Insights` is the
one service over them. Rows come back as the typed dicts of ``base``.
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

from kaiju_tasks import errors
from kaiju_tasks.store import base, driver, locks
from kaiju_tasks.store.queries import QUERIES


class PostgresInsights(driver.Queries, base.InsightsStore):
    """The InsightsStore on PostgreSQL via an asyncpg pool."""

    async def task_counts(self) -> list[base.TaskCount]:
        """Tasks by app and status, ordered by app then status."""
        return driver.as_rows(await self._fetch("task_counts"))

    async def queue_lag(self, *, now: datetime) -> list[base.QueueLag]:
        """Per app with QUEUED tasks, the age at ``now`` of the oldest, ordered by app."""
        return driver.as_rows(await self._fetch("queue_lag", now))

    async def cluster(self, *, alive_since: datetime) -> base.Cluster:
        """Leader, live executors (debug ones among them) and the last event id."""
        classid, objid = locks.halves(locks.LEADER_LOCK_KEY)
        row = await self._fetchrow("cluster", alive_since, classid, objid)
        assert row is not None
        return cast(base.Cluster, row)

    async def workers(self, *, heard_since: datetime, limit: int | None) -> list[base.ExecutorRow]:
        """Executors heard from (or stopped) since ``heard_since``, live ones first."""
        return driver.as_rows(await self._fetch("workers", heard_since, limit))

    async def active_tasks(self, *, limit: int) -> list[base.ActiveTask]:
        """Tasks running or waiting, the longest in their status first."""
        return driver.as_rows(await self._fetch("active_tasks", limit))

    async def top(self, *, heard_since: datetime, limit: int) -> base.TopSnapshot:
        """Executors heard from lately (by id), running and waiting tasks, counts by app and status.

        Read in one snapshot, so the counts and the lists agree.
        """
        async with (
            self._connection() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            workers = await connection.fetch(QUERIES["workers"], heard_since, None)
            tasks = await connection.fetch(QUERIES["active_tasks"], limit)
            counts = await connection.fetch(QUERIES["task_counts"])
        return {
            "workers": sorted(driver.as_rows(workers), key=lambda w: w["id"]),
            "tasks": driver.as_rows(tasks),
            "counts": driver.as_rows(counts),
        }

    async def throughput(self, *, now: datetime, minutes: int) -> list[base.MinuteCount]:
        """Per minute of the ``minutes`` up to ``now`` that saw any: tasks finished and failed."""
        return driver.as_rows(await self._fetch("throughput", now, minutes))

    async def timeline(self, task_id: str, *, since: datetime, limit: int) -> list[base.EventRow]:
        """The newest ``limit`` events of a task written since ``since``, oldest first."""
        return driver.as_rows(await self._fetch("timeline", task_id, limit, since))

    async def raw_task(self, task_id: str, *, chars: int) -> base.RawTask | None:
        """A task's facts and its JSON columns as stored text (each cut to ``chars``)."""
        return cast(base.RawTask | None, await self._fetchrow("raw_task", task_id, chars))

    async def unserved_apps(
        self, *, now: datetime, alive_since: datetime, limit: int | None
    ) -> list[base.UnservedApp]:
        """Apps with QUEUED tasks that no live executor serves: ``{app, queued, waiting_s}``."""
        return driver.as_rows(await self._fetch("unserved_apps", now, alive_since, limit))

    async def served_apps(self, *, alive_since: datetime) -> set[str]:
        """The apps live executors serve (heard from after ``alive_since``, not stopped)."""
        return {r["app"] for r in await self._fetch("served_apps", alive_since)}

    async def events_after(
        self, cursor: base.EventCursor | None, *, limit: int, snapshot: bool = False
    ) -> list[base.EventRow]:
        """Events after ``cursor`` (``(xid, id)``; None: the oldest kept), none missed.

        ``snapshot=True`` reads every committed event, for a one-off replay that is not
        followed afterwards (following needs the default, which waits for open transactions).
        """
        xid, event_id = cursor if cursor is not None else (None, None)
        return driver.as_rows(await self._fetch("events_after", xid, event_id, limit, snapshot))

    async def ended_counts(
        self, cursor: base.EventCursor | None
    ) -> tuple[base.EventCursor | None, list[base.EndedCount]]:
        """Task runs ended after ``cursor`` by app and status, and the cursor after them.

        Rows are ``{app, status, count}`` (``app`` None for a task deleted since), the most
        first; the cursor comes back as given when no event was written since.
        """
        xid, event_id = cursor if cursor is not None else (None, None)
        rows = await self._fetch("ended_counts", xid, event_id)
        if not rows:
            return cursor, []
        ended: list[base.EndedCount] = [
            {"app": r["app"], "status": r["status"], "count": r["count"]}
            for r in rows
            if r["status"] is not None
        ]
        return (rows[0]["xid"], rows[0]["id"]), ended

    async def event_cursor(self, event_id: int | None) -> base.EventCursor | None:
        """The cursor after event ``event_id``, or after the newest event when None."""
        if event_id is None:
            row = await self._fetchrow("latest_event_cursor")
        else:
            row = await self._fetchrow("event_cursor", event_id)
            if row is None:
                raise errors.ValidationError(f"no event {event_id} is kept", field="after_id")
        return (row["xid"], row["id"]) if row is not None else None
