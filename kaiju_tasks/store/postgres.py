"""PostgresTaskStore: runs queries, maps rows to dicts, translates driver errors.

Fixed queries come from ``queries.sql`` and run through asyncpg (prepared statements are cached per
connection); user-driven listings are compiled from ``tables.py`` with every value bound.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg
import sqlalchemy as sa

from kaiju_tasks import errors
from kaiju_tasks.store import base, tables
from kaiju_tasks.store.queries import QUERIES

logger = logging.getLogger(__name__)

Row = dict[str, Any]

DEFAULT_POOL_MIN = 2
DEFAULT_POOL_MAX = 10


def _json_dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


async def init_connection(connection: asyncpg.Connection) -> None:
    """Decode json/jsonb columns to Python values and encode Python values to JSON."""
    for name in ("json", "jsonb"):
        await connection.set_type_codec(
            name, encoder=_json_dumps, decoder=json.loads, schema="pg_catalog"
        )


async def create_pool(
    dsn: str, *, min_size: int = DEFAULT_POOL_MIN, max_size: int = DEFAULT_POOL_MAX
) -> asyncpg.Pool:
    """Open a connection pool with the JSON codecs installed."""
    try:
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, init=init_connection
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise errors.StoreError(f"cannot connect to the database: {exc}") from exc
    assert pool is not None
    return pool


@contextlib.contextmanager
def _translate() -> Any:
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        raise errors.Conflict(_detail(exc) or "the object already exists") from exc
    except asyncpg.ForeignKeyViolationError as exc:
        raise errors.ValidationError(
            _detail(exc) or "a referenced task does not exist", field="next_task"
        ) from exc
    except asyncpg.CheckViolationError as exc:
        constraint = getattr(exc, "constraint_name", None)
        raise errors.ValidationError(
            f"violates constraint {constraint}", field=getattr(exc, "column_name", None)
        ) from exc
    except (asyncpg.DataError, asyncpg.InvalidTextRepresentationError) as exc:
        raise errors.ValidationError(str(exc)) from exc
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise errors.StoreError(f"database error: {exc}") from exc


def _detail(exc: asyncpg.PostgresError) -> str | None:
    detail = getattr(exc, "detail", None)
    return str(detail) if detail else None


def _row(record: asyncpg.Record | None) -> Row | None:
    return dict(record) if record is not None else None


class PostgresTaskStore(base.TaskStore):
    """The TaskStore on PostgreSQL via an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        with _translate():
            async with self.pool.acquire() as connection:
                yield connection

    async def _fetchrow(self, query: str, *args: Any) -> Row | None:
        async with self._connection() as connection:
            return _row(await connection.fetchrow(QUERIES[query], *args))

    # -- tasks --------------------------------------------------------------------------------

    async def insert_tasks(self, rows: Sequence[Mapping[str, Any]]) -> list[Row]:
        """Insert complete task rows in one statement; return them as stored."""
        if not rows:
            return []
        async with self._connection() as connection:
            records = await connection.fetch(QUERIES["insert_tasks"], list(rows))
        return [dict(r) for r in records]

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
        async with self._connection() as connection:
            records = await connection.fetch(QUERIES["task_owners"], list(ids))
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
            return _row(await connection.fetchrow(sql, *params))

    async def delete_task(self, task_id: str, *, modify_all: bool, user_id: str | None) -> bool:
        """Delete a task the caller may change; return whether it was deleted."""
        return await self._fetchrow("delete_task", task_id, modify_all, user_id) is not None

    async def reset_task(
        self, task_id: str, *, job_id: str, now: datetime, modify_all: bool, user_id: str | None
    ) -> Row | None:
        """Reset a task that is not running and queue it; None if not allowed."""
        return await self._fetchrow("reset_task", task_id, modify_all, user_id, job_id, now)

    async def write_message(
        self, task_id: str, data: Any, *, now: datetime, modify_all: bool, user_id: str | None
    ) -> Row | None:
        """Deliver a message to a task waiting on a Message stage; None if it is not waiting."""
        return await self._fetchrow("write_message", task_id, modify_all, user_id, data, now)

    async def cancel_task(
        self,
        task_id: str,
        error: Mapping[str, Any],
        *,
        now: datetime,
        modify_all: bool,
        user_id: str | None,
    ) -> Row | None:
        """Abort a task that has not ended; None if it already ended or is not the caller's."""
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
        page_sql, page_params = tables.to_sql(
            tables.select_page(
                table,
                where=where,
                columns=columns,
                order=order,
                offset=query.offset,
                limit=query.limit,
            )
        )
        async with self._connection() as connection:
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
