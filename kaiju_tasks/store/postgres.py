"""PostgresTaskStore and PostgresEngineStore: run queries, map rows to dicts.

Fixed queries come from ``queries.sql`` and run through asyncpg (prepared statements are cached per
connection, see ``driver.py``); user-driven listings are compiled from ``tables.py`` with every
value bound. The monitoring reads these stores answer too are in ``insights.py``; the managers'
leadership lock is in ``leadership.py``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

import asyncpg
import sqlalchemy as sa

from kaiju_tasks import _gc, errors, limits
from kaiju_tasks.store import base, copy, driver, insights, tables
from kaiju_tasks.store.driver import (
    DEFAULT_POOL_MAX,
    DEFAULT_POOL_MIN,
    SAFE_QUERIES,
    PoolerConnection,
    connection_lost,
    create_pool,
    init_connection,
)
from kaiju_tasks.store.queries import QUERIES

__all__ = [
    "COPY_MIN_ROWS",
    "DEFAULT_POOL_MAX",
    "DEFAULT_POOL_MIN",
    "SAFE_QUERIES",
    "PoolerConnection",
    "PostgresEngineStore",
    "PostgresTaskStore",
    "connection_lost",
    "create_pool",
    "init_connection",
]

Row = dict[str, Any]

COPY_MIN_ROWS = 64
"""From this many rows on, ``insert_tasks`` writes with binary COPY instead of one INSERT."""

_ALL_COLUMNS = tuple(str(column.name) for column in tables.tasks.columns)
_ID = base.NEW_TASK_COLUMNS.index("id")


class PostgresTaskStore(insights.PostgresInsights, base.TaskStore, base.SessionStore):
    """The TaskStore (and the InsightsStore and SessionStore) on PostgreSQL via an asyncpg pool."""

    # -- tasks --------------------------------------------------------------------------------

    async def insert_tasks(
        self,
        rows: base.NewTasks,
        columns: Sequence[str] | None = None,
        *,
        trace: Mapping[str, str] | None = None,
    ) -> list[Row]:
        """Insert new task rows in one transaction; return ``columns`` of them as stored.

        Each queued task gets a ``task-sent`` event, and the executors of its app are woken
        (``NOTIFY kaiju_tasks_queued``) when the transaction commits. Up to
        :data:`COPY_MIN_ROWS` - 1 rows go in one ``INSERT`` statement that returns them. More
        go through binary ``COPY`` (tasks, then events) in one transaction, read as they are
        sent (an error raised while building a row aborts it all), and are returned as
        PostgreSQL would return them without being read back (see :func:`copy.stored_task`).
        ``trace``: the creator's trace context, stored in the same transaction (``trace``).
        """
        if not rows:
            return []
        names = _ALL_COLUMNS if columns is None else tuple(columns)
        if len(rows) < COPY_MIN_ROWS:
            objects = [dict(zip(base.NEW_TASK_COLUMNS, r, strict=True)) for r in rows]
            async with self._connection() as connection:
                if trace is None:
                    records = await connection.fetch(QUERIES["insert_tasks"], objects)
                else:
                    async with connection.transaction():
                        records = await connection.fetch(QUERIES["insert_tasks"], objects)
                        await self._trace(connection, [r["id"] for r in records], trace)
            return [
                {name: trace if name == "trace" and trace else r[name] for name in names}
                for r in records
            ]
        data = copy.NewTasks(rows)
        async with self._connection() as connection, connection.transaction():
            # From here on everything allocated stays alive until the rows are returned, so
            # collections would free nothing; the pause starts once the connection is held.
            with _gc.paused():
                stored = await self._copy_tasks(connection, data, names)
                if trace is not None:
                    await self._trace(connection, [row[_ID] for row in data.rows], trace)
                    if "trace" in names:
                        for row in stored:
                            row["trace"] = dict(trace)
                return stored

    @staticmethod
    async def _trace(
        connection: asyncpg.Connection, ids: list[str], trace: Mapping[str, str]
    ) -> None:
        await connection.execute(QUERIES["trace_tasks"], ids, dict(trace))

    async def _copy_tasks(
        self, connection: asyncpg.Connection, data: copy.NewTasks, names: tuple[str, ...]
    ) -> list[Row]:
        """Write ``data`` (tasks, then their task-sent events) and return its rows as stored."""
        await connection.copy_to_table(
            "tasks",
            source=copy.chunks(data.tasks()),
            columns=base.NEW_TASK_COLUMNS,
            format="binary",
        )
        if data.queued:
            await connection.copy_to_table(
                "events",
                source=copy.chunks(data.events()),
                columns=copy.EVENT_COLUMNS,
                format="binary",
            )
            await connection.fetchval(QUERIES["notify_queued"], sorted(data.apps))
        if names == ("id",):
            return [{"id": row[_ID]} for row in data.rows]
        stored: list[Row] = []
        reread: list[tuple[int, str]] = []  # index and id: JSON PostgreSQL may write otherwise
        for row in data.rows:
            as_stored, again = copy.stored_task(row, names)
            if again:
                reread.append((len(stored), row[_ID]))
            stored.append(as_stored)
        if reread:
            json_columns = [n for n in names if n in copy.JSON_COLUMNS]
            records = await connection.fetch(
                QUERIES["task_json"], [task_id for _, task_id in reread]
            )
            by_id = {r["id"]: r for r in records}
            for i, task_id in reread:
                stored[i].update({n: by_id[task_id][n] for n in json_columns})
        return stored

    async def insert_full(self, row: Mapping[str, Any]) -> Row:
        """Insert a task row in any state, columns as given (for tests and repairs)."""
        statement = sa.insert(tables.tasks).values(**row).returning(*tables.tasks.c)
        sql, params = tables.to_sql(statement)
        async with self._connection() as connection:
            record = await connection.fetchrow(sql, *params)
        assert record is not None
        return dict(record)

    async def get_task(self, task_id: str) -> Row | None:
        """Return one task row, or None."""
        return await self._fetchrow("get_task", task_id)

    async def task_owners(self, ids: Sequence[str]) -> dict[str, str | None]:
        """Return ``{id: user_id}`` for those of ``ids`` that exist."""
        records = await self._safe("task_owners", "fetch", list(ids))
        return {r["id"]: r["user_id"] for r in records}

    async def list_tasks(self, query: base.ListQuery) -> base.Page:
        """Return one page of tasks matching ``query``."""
        return await self._list(tables.tasks, query)

    async def update_task(
        self,
        task_id: str,
        changes: Mapping[str, Any],
        *,
        modify_all: bool,
        user_id: str | None,
        allowed_statuses: Sequence[str] | None,
        commands_statuses: Sequence[str] | None,
    ) -> Row | None:
        """Apply ``changes`` if the caller may and the task's status allows; else None.

        ``allowed_statuses`` guards any change; ``commands_statuses`` additionally guards a change
        of ``commands`` (QUEUED counts only before its first stage ran).
        """
        t = tables.tasks
        where: list[Any] = [t.c.id == task_id]
        if not modify_all:
            where.append(t.c.user_id == user_id if user_id is not None else sa.false())
        if allowed_statuses is not None:
            where.append(t.c.status.in_(list(allowed_statuses)))
        if commands_statuses is not None:
            where.append(
                sa.or_(
                    t.c.status.in_([s for s in commands_statuses if s != "QUEUED"]),
                    sa.and_(t.c.status == "QUEUED", t.c.stage == 0),
                )
            )
        statement = sa.update(t).where(*where).values(**changes).returning(*t.c)
        sql, params = tables.to_sql(statement)
        async with self._connection() as connection:
            return driver.as_row(await connection.fetchrow(sql, *params))

    async def delete_task(self, task_id: str, *, modify_all: bool, user_id: str | None) -> bool:
        """Delete a task the caller may change; return whether it was deleted."""
        return await self._fetchrow("delete_task", task_id, modify_all, user_id) is not None

    async def reset_task(
        self, task_id: str, *, job_id: str, now: datetime, modify_all: bool, user_id: str | None
    ) -> Row | None:
        """Reset a task that is not running and queue it; None if not allowed."""
        return await self._fetchrow("reset_task", task_id, modify_all, user_id, job_id, now)

    async def write_message(
        self,
        task_id: str,
        data: Any,
        *,
        now: datetime,
        modify_all: bool,
        user_id: str | None,
        results_left: int,
    ) -> Row | None:
        """Deliver a message to a task waiting on a Message stage.

        None if it is not waiting, or its stored results take more than ``results_left`` bytes
        of JSON.
        """
        return await self._fetchrow(
            "write_message", task_id, modify_all, user_id, data, now, results_left
        )

    async def cancel_task(
        self,
        task_id: str,
        error: Mapping[str, Any],
        *,
        now: datetime,
        modify_all: bool,
        user_id: str | None,
    ) -> Row | None:
        """Abort a task that has not ended; None if it already ended or is not the caller's.

        ``error`` is stored with the task's current ``stage`` added.
        """
        return await self._fetchrow("cancel_task", task_id, modify_all, user_id, error, now)

    # -- notifications ------------------------------------------------------------------------

    async def insert_notification(self, row: Mapping[str, Any]) -> Row:
        """Record a run of a task."""
        record = await self._fetchrow(
            "insert_notification",
            row["task_id"],
            row.get("job_id"),
            row["status"],
            row.get("result", []),
            row.get("exit_code"),
            row.get("error"),
            row.get("user_id"),
            row["created"],
        )
        assert record is not None
        return record

    async def get_notification(
        self, notification_id: int, *, view_all: bool, user_id: str | None
    ) -> Row | None:
        """Return a notification the caller may see, or None."""
        return await self._fetchrow("get_notification", notification_id, view_all, user_id)

    async def list_notifications(self, query: base.ListQuery) -> base.Page:
        """Return one page of notifications matching ``query``."""
        return await self._list(tables.notifications, query)

    async def update_notification(
        self, notification_id: int, read: bool, *, modify_all: bool, user_id: str | None
    ) -> Row | None:
        """Mark a notification read or unread; None if absent or not the caller's."""
        return await self._fetchrow(
            "update_notification", notification_id, modify_all, user_id, read
        )

    async def delete_notification(
        self, notification_id: int, *, modify_all: bool, user_id: str | None
    ) -> bool:
        """Delete a notification the caller may change."""
        found = await self._fetchrow("delete_notification", notification_id, modify_all, user_id)
        return found is not None

    # -- API tokens ---------------------------------------------------------------------------

    async def insert_token(
        self,
        token_hash: str,
        *,
        user_id: str,
        permissions: Sequence[str],
        name: str | None,
        now: datetime,
    ) -> Row:
        """Store a token's hash and grants."""
        row = await self._fetchrow(
            "insert_token", token_hash, user_id, list(permissions), name, now
        )
        assert row is not None
        return row

    async def find_token(self, token_hash: str) -> Row | None:
        """Return the grants of an active token."""
        return await self._fetchrow("find_token", token_hash)

    async def list_tokens(self) -> list[Row]:
        """Return every token without its hash."""
        return [dict(r) for r in await self._safe("list_tokens", "fetch")]

    async def revoke_token(self, token_id: int, *, now: datetime) -> Row | None:
        """Revoke an active token."""
        return await self._fetchrow("revoke_token", token_id, now)

    # -- dashboard sessions -------------------------------------------------------------------

    async def start_session(
        self,
        id_hash: str,
        token_hash: str,
        *,
        now: datetime,
        expires: datetime,
        keep: int,
        lifetime: timedelta,
    ) -> bool:
        """Start a session for an active token; False if the token is unknown or revoked.

        Also ends the token's sessions beyond its newest ``keep`` and every ended session.
        """
        async with self._connection() as connection, connection.transaction():
            token_id = await connection.fetchval(
                QUERIES["session_start"], id_hash, token_hash, now, expires
            )
            if token_id is None:
                return False
            await connection.execute(QUERIES["session_trim"], token_id, keep)
            await connection.execute(QUERIES["session_prune"], now, lifetime)
        return True

    async def find_session(
        self,
        id_hash: str,
        *,
        now: datetime,
        idle: timedelta,
        lifetime: timedelta,
        touch: timedelta,
    ) -> base.SessionRow | None:
        """The caller a live session stands for at ``now`` (extending an idle expiry)."""
        async with self._connection() as connection:
            row = await connection.fetchrow(
                QUERIES["session_find"], id_hash, now, idle, lifetime, touch
            )
        return None if row is None else cast(base.SessionRow, dict(row))

    async def end_session(self, id_hash: str) -> None:
        """End a session."""
        async with self._connection() as connection:
            await connection.execute(QUERIES["session_end"], id_hash)

    # -- listings -----------------------------------------------------------------------------

    async def _list(self, table: sa.Table, query: base.ListQuery) -> base.Page:
        where: list[Any] = []
        clause = tables.compile_conditions(table, query.conditions)
        if clause is not None:
            where.append(clause)
        if not query.view_all:
            where.append(
                table.c.user_id == query.user_id if query.user_id is not None else sa.false()
            )
        columns = tables.compile_columns(table, query.columns)
        order = tables.compile_sort(table, query.sort)
        page = tables.select_page(
            table, where=where, columns=columns, order=order, offset=query.offset, limit=query.limit
        )
        page_sql, page_params = tables.to_sql(page)
        size_query = tables.page_size(page, columns)
        async with (
            self._connection() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            if size_query is not None:
                # One snapshot for the size and the rows: the page read is the page measured.
                size_sql, size_params = tables.to_sql(size_query)
                size = int(await connection.fetchval(size_sql, *size_params))
                bound = limits.active().reply_bytes
                if size > bound:
                    raise errors.ValidationError(
                        f"the page would be {size:,} bytes of JSON, more than reply_bytes"
                        f" ({limits.describe(bound)}): ask for fewer columns or a smaller limit",
                        field="limit",
                    )
            records = await connection.fetch(page_sql, *page_params)
            count: int | None = None
            if query.count:
                count_sql, count_params = tables.to_sql(tables.count_rows(table, where))
                count = await connection.fetchval(count_sql, *count_params)
        data = [dict(r) for r in records]
        return base.Page(
            count=count,
            offset=query.offset,
            page=query.offset // query.limit + 1,
            pages=math.ceil(count / query.limit) if count is not None else None,
            on_page=len(data),
            data=data,
        )


class PostgresEngineStore(PostgresTaskStore, base.EngineStore):
    """The transitions the manager and executors make, each one guarded statement."""

    # -- executors ----------------------------------------------------------------------------

    async def register_executor(
        self,
        executor_id: str,
        *,
        apps: Sequence[str],
        host: str,
        pid: int,
        concurrency: int,
        now: datetime,
        debug: bool = False,
        lease: timedelta | None = None,
    ) -> None:
        """Record an executor coming online (``worker-online``)."""
        async with self._connection() as connection:
            await connection.execute(
                QUERIES["register_executor"],
                executor_id,
                list(apps),
                host,
                pid,
                concurrency,
                now,
                debug,
                lease,
            )

    async def heartbeat(self, executor_id: str, *, active: int, now: datetime) -> bool:
        """Record that an executor is alive; False if its row is gone."""
        return bool(await self._fetchval("heartbeat", executor_id, now, active))

    async def executor_stopped(self, executor_id: str, *, now: datetime) -> None:
        """Record an executor going offline (``worker-offline``)."""
        async with self._connection() as connection:
            await connection.execute(QUERIES["executor_stopped"], executor_id, now)

    async def claim(
        self, apps: Sequence[str], executor_id: str, *, limit: int, now: datetime
    ) -> list[base.TaskRow]:
        """Claim up to ``limit`` QUEUED tasks of ``apps`` (EXECUTED by ``executor_id``)."""
        if len(apps) == 1:  # the common case, with a plan PostgreSQL keeps
            rows = await self._fetch("claim_one", apps[0], executor_id, limit, now)
        else:
            rows = await self._fetch("claim", list(apps), executor_id, limit, now)
        return driver.as_rows(rows)

    async def record_stages(
        self, executor_id: str, items: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> set[str]:
        """Commit finished intermediate stages; return the ids that applied."""
        rows = await self._fetch("record_stages", list(items), executor_id, now)
        return {r["id"] for r in rows}

    async def finish_tasks(
        self, executor_id: str, items: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> set[str]:
        """Finish tasks (notifications, chaining, cron next run); return the ids that applied."""
        rows = await self._fetch("finish_tasks", list(items), executor_id, now)
        return {r["id"] for r in rows}

    async def fail_tasks(
        self, items: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> list[base.FailedRow]:
        """Fail or retry tasks; return ``[{id, status, executor_id, claim_id}]`` that applied."""
        return driver.as_rows(await self._fetch("fail_tasks", list(items), now))

    async def requeue_rejected(
        self, executor_id: str, items: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> set[str]:
        """Put rejected tasks back in the queue without counting a retry."""
        rows = await self._fetch("requeue_rejected", list(items), executor_id, now)
        return {r["id"] for r in rows}

    async def wait_tasks(
        self, executor_id: str, items: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> set[str]:
        """Park tasks on Timer/Message stages; return the ids that applied."""
        rows = await self._fetch("wait_tasks", list(items), executor_id, now)
        return {r["id"] for r in rows}

    async def suspend_executor_tasks(
        self, executor_id: str, claim_ids: Sequence[str], *, now: datetime
    ) -> set[str]:
        """Hand back the runs (claim ids) an executor holds; return their task ids.

        They turn SUSPENDED, and the manager is woken at commit to re-queue them at once.
        """
        rows = await self._fetch("suspend_executor_tasks", executor_id, now, list(claim_ids))
        return {r["id"] for r in rows}

    async def release_tasks(
        self, executor_id: str, claim_ids: Sequence[str], *, now: datetime
    ) -> set[str]:
        """Queue again runs claimed ahead whose stage has not started; return their task ids.

        In their place in the queue (``queued_at`` kept), or IDLE until enabled; the executors
        of their app are woken at commit.
        """
        rows = await self._fetch("release_tasks", executor_id, now, list(claim_ids))
        return {r["id"] for r in rows}

    async def orphans(self, executor_id: str, running: Sequence[str]) -> list[str]:
        """Return the claim ids ``executor_id`` holds in the database but does not run."""
        rows = await self._fetch("orphans", executor_id, list(running))
        return [r["claim_id"] for r in rows if r["claim_id"] is not None]

    async def task_status(self, ids: Sequence[str]) -> dict[str, base.TaskStatusRow]:
        """Return ``{id: {id, status, stage, executor_id, claim_id}}`` for existing tasks."""
        rows: list[base.TaskStatusRow] = driver.as_rows(await self._fetch("task_status", list(ids)))
        return {r["id"]: r for r in rows}

    # -- manager ------------------------------------------------------------------------------

    async def queue_due(self, *, now: datetime, limit: int) -> int:
        """Queue due IDLE tasks and ended cron tasks at their fire time."""
        return int(await self._fetchval("queue_due", now, limit))

    async def release_timers(self, *, now: datetime, limit: int) -> int:
        """Resume tasks whose Timer is due."""
        return int(await self._fetchval("release_timers", now, limit))

    async def overdue(self, *, now: datetime, limit: int) -> list[base.OverdueRow]:
        """Return tasks past their run deadline or Message wait deadline."""
        return driver.as_rows(await self._fetch("overdue", now, limit))

    async def suspend_stale(
        self,
        *,
        now: datetime,
        silent_since: datetime | None,
        limit: int,
        observed_since: datetime | None = None,
    ) -> int:
        """Suspend tasks of executors silent since ``silent_since`` or offline.

        A silent executor counts as lost only once its lease (if it recorded one) has also run
        out since its last heartbeat, or since ``observed_since`` if that is later.
        """
        return int(await self._fetchval("suspend_stale", now, silent_since, limit, observed_since))

    async def requeue_suspended(self, *, now: datetime, limit: int) -> int:
        """Queue SUSPENDED tasks again at their stage."""
        return int(await self._fetchval("requeue_suspended", now, limit))

    async def debug_orphans(
        self, *, silent_since: datetime | None, limit: int, apps: Sequence[str] | None = None
    ) -> list[base.DebugOrphanRow]:
        """Tasks waiting in debug queues that no live debug executor serves (see the query)."""
        rows = await self._fetch(
            "debug_orphans", limit, silent_since, list(apps) if apps is not None else None
        )
        return driver.as_rows(rows)

    async def prune(self, what: str, *, before: datetime, limit: int) -> int:
        """Delete ``tasks``, ``notifications``, ``events`` or ``executors`` older than before."""
        query = {
            "tasks": "prune_tasks",
            "notifications": "prune_notifications",
            "events": "prune_events",
            "executors": "prune_executors",
        }[what]
        async with self._connection() as connection:
            status = await connection.execute(QUERIES[query], before, limit)
        return int(status.split()[-1])

    async def notify_cancel(self, runs: Sequence[str]) -> None:
        """Tell executors to abandon these runs (``"task_id claim_id"``)."""
        await self._fetchval("notify_cancel", list(runs))


def __getattr__(name: str) -> Any:
    # The leadership left this module for leadership.py; its names are still found here.
    if name in ("AdvisoryLeadership", "LEADER_LOCK_KEY", "GC_LOCK_KEY"):
        from kaiju_tasks.store import leadership

        return getattr(leadership, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
