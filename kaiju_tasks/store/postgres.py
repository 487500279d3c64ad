"""PostgresTaskStore: runs queries, maps rows to dicts, translates driver errors.

Fixed queries come from ``queries.sql`` and run through asyncpg (prepared statements are cached per
connection); user-driven listings are compiled from ``tables.py`` with every value bound.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar

import asyncpg
import orjson
import sqlalchemy as sa

from kaiju_tasks import _gc, errors, limits, logs, redact
from kaiju_tasks.store import base, copy, tables
from kaiju_tasks.store.queries import QUERIES

logger = logging.getLogger(__name__)

Row = dict[str, Any]

DEFAULT_POOL_MIN = 2
DEFAULT_POOL_MAX = 10


def _json_dumps(value: Any) -> str:
    # orjson writes datetimes as RFC 3339, which PostgreSQL reads back as timestamptz.
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


async def init_connection(connection: asyncpg.Connection) -> None:
    """Decode json/jsonb columns to Python values and encode Python values to JSON.

    jsonb travels in its binary format (a version byte and the same JSON text), which binary
    ``COPY`` needs (see :meth:`PostgresTaskStore.insert_tasks`); the values are the same.
    """
    await connection.set_type_codec(
        "json", encoder=_json_dumps, decoder=orjson.loads, schema="pg_catalog"
    )
    await connection.set_type_codec(
        "jsonb",
        encoder=copy.jsonb_value,
        decoder=copy.jsonb_from,
        schema="pg_catalog",
        format="binary",
    )


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Return a connection to the pool as it is: one round trip less per store call.

    By default asyncpg runs ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` at every release, a round trip that every claim, stage write and create waited
    for. The store's statements leave no session state behind: no ``SET``, cursors live only
    inside transactions, and the advisory lock (leadership) and ``LISTEN`` (wake-ups) use
    connections of their own. asyncpg still rolls back a transaction left open and drops
    listeners before calling this.
    """


class PoolerConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection through a transaction pooler (PgBouncer with ``pool_mode = transaction``).

    Such a pooler may hand each transaction to a different server connection, and asyncpg
    sends a statement's Parse and its Bind/Execute in two rounds: outside a transaction, the
    second may reach a server that never saw the first. Here every statement with parameters
    that is not already in a transaction runs in one of its own, which the pooler keeps on
    one server connection; the pool caches no named prepared statements (PgBouncer before
    1.21 cannot keep them). Overrides asyncpg's ``_execute``, the one path its ``fetch``,
    ``fetchrow``, ``fetchval`` and ``execute`` with arguments share (asyncpg 0.29 to 0.32).
    """

    async def _execute(self, query: str, args: Any, *rest: Any, **options: Any) -> Any:
        if self.is_in_transaction():
            return await super()._execute(query, args, *rest, **options)
        async with self.transaction():
            return await super()._execute(query, args, *rest, **options)


async def create_pool(
    dsn: str,
    *,
    min_size: int = DEFAULT_POOL_MIN,
    max_size: int = DEFAULT_POOL_MAX,
    application_name: str = "kaiju-tasks",
    pooler: bool = False,
) -> asyncpg.Pool:
    """Open a connection pool with the JSON codecs installed.

    ``application_name`` shows in ``pg_stat_activity`` (e.g. ``kaiju-tasks-executor``).
    Connections go back to the pool without asyncpg's reset query (see :func:`_keep_session`).
    ``pooler``: ``dsn`` is a transaction pooler such as PgBouncer (see :class:`PoolerConnection`);
    LISTEN, the leadership lock and migrations then need a direct DSN of their own.
    """
    logs.quiet_pool_refills()
    options: dict[str, Any] = (
        {"connection_class": PoolerConnection, "statement_cache_size": 0} if pooler else {}
    )
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=init_connection,
            reset=_keep_session,
            server_settings={"application_name": application_name},
            **options,
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, TypeError) as exc:
        raise errors.StoreError(redact.connect_failure(exc)) from None
    assert pool is not None
    return pool


@contextlib.contextmanager
def _translate() -> Any:
    try:
        yield
    except asyncpg.UniqueViolationError as exc:
        match = re.search(r"\(id\)=\((.*)\) already exists", _detail(exc) or "")
        raise errors.Conflict(
            f"task {match.group(1)!r} already exists" if match else "the object already exists",
            field="id",
        ) from exc
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
    except (
        OSError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        asyncpg.InternalClientError,  # a connection the server closed mid-operation
    ) as exc:
        raise errors.StoreError(f"database error: {exc}") from exc


_LOST = (
    OSError,  # refused, reset, timed out
    asyncpg.PostgresConnectionError,  # 08xxx: the connection does not exist or failed
    asyncpg.exceptions.AdminShutdownError,  # 57P01: pg_terminate_backend, a fast shutdown
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: the server is starting or stopping
    asyncpg.InterfaceError,  # the connection was closed in the middle of an operation
    asyncpg.InternalClientError,
)
"""Errors after which the connection (and likely its pool mates) is gone."""

SAFE_QUERIES = frozenset(
    {
        "get_task",
        "task_owners",
        "task_json",
        "get_notification",
        "find_token",
        "list_tokens",
        "top",
        "metrics",
        "events_after",
        "event_cursor",
        "latest_event_cursor",
        "task_status",
        "orphans",
        "overdue",
        "health",
        "heartbeat",  # sets the same heartbeat_at again; an extra heartbeat event is harmless
    }
)
"""Queries tried once more on a fresh connection when the connection is lost under them: they
read, or write what writing twice leaves the same. Other writes are not, since whether they
committed is unknown; their callers decide."""


def connection_lost(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or the driver error behind a StoreError) means a lost connection."""
    if isinstance(exc, errors.StoreError):
        exc = exc.__cause__
    return isinstance(exc, _LOST)


def _detail(exc: asyncpg.PostgresError) -> str | None:
    detail = getattr(exc, "detail", None)
    return str(detail) if detail else None


def _row(record: asyncpg.Record | None) -> Row | None:
    return dict(record) if record is not None else None


# -- bulk insert through COPY --------------------------------------------------------------------

COPY_MIN_ROWS = 64
"""From this many rows on, ``insert_tasks`` writes with binary COPY instead of one INSERT."""

_ALL_COLUMNS = tuple(str(column.name) for column in tables.tasks.columns)
_ID = base.NEW_TASK_COLUMNS.index("id")


class _Reread(Exception):
    """A JSON value whose stored form is left to PostgreSQL to say."""


def _jsonb_key(key: str) -> tuple[int, bytes]:
    encoded = key.encode()
    return len(encoded), encoded


_SCALARS = frozenset({str, int, bool, type(None)})
_KEY_ORDERS: dict[tuple[str, ...], tuple[str, ...]] = {}
"""jsonb's order of the keys of objects seen, by their order in the Python dict."""
_KEY_ORDERS_MAX = 4096


def _as_jsonb(value: Any) -> Any:
    """Return ``value`` as jsonb gives it back: object keys shortest first, then bytewise.

    Numbers other than integers (floats are rewritten by jsonb's ``numeric``) and any type that
    is not plain JSON raise :class:`_Reread`.
    """
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        if len(value) < 2:
            return {k: v if type(v) in _SCALARS else _as_jsonb(v) for k, v in value.items()}
        keys = tuple(value)
        order = _KEY_ORDERS.get(keys)
        if order is None:
            order = tuple(sorted(keys, key=_jsonb_key))
            if len(_KEY_ORDERS) < _KEY_ORDERS_MAX:
                _KEY_ORDERS[keys] = order
        return {k: v if type(v := value[k]) in _SCALARS else _as_jsonb(v) for k in order}
    if kind is list:
        return [v if type(v) in _SCALARS else _as_jsonb(v) for v in value]
    raise _Reread


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is UTC:
        return value
    return value.astimezone(UTC)


_NEW = {name: i for i, name in enumerate(base.NEW_TASK_COLUMNS)}
_JSON_COLUMNS = frozenset({"commands", "kws", "meta"})
_STARTING_VALUES: dict[str, Any] = {
    "retries": 0,
    "stage": 0,
    "result": None,  # a new list per row, see _stored_task
    "error": None,
    "exit_code": None,
    "executor_id": None,
    "wait_deadline": None,
    "requeues": 0,
    "claim_id": None,
    "trace": None,
}
"""The columns a new row does not give, as the table's defaults set them."""


def _stored_task(row: base.NewTask, columns: Sequence[str]) -> tuple[Row, bool]:
    """Return ``columns`` of the row ``RETURNING *`` would give for a new task.

    With it, whether its JSON is to be read back from the table (see :class:`_Reread`).
    """
    stored: Row = {}
    reread = False
    for name in columns:
        index = _NEW.get(name)
        if index is None:
            stored[name] = [] if name == "result" else _STARTING_VALUES[name]
            continue
        value = row[index]
        if name in _JSON_COLUMNS:
            try:
                value = _as_jsonb(value)
            except _Reread:
                reread = True
        elif name in base.TIME_COLUMNS:
            value = _utc(value)
        stored[name] = value
    return stored, reread


class PostgresTaskStore(base.TaskStore):
    """The TaskStore on PostgreSQL via an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            with _translate():
                async with self.pool.acquire() as connection:
                    yield connection
        except errors.StoreError as exc:
            if connection_lost(exc):
                # A connection the server dropped is closed by the pool at release; the others
                # likely went with it (a restart, a failover): each is replaced at its next use
                # rather than failing its next caller.
                await self.pool.expire_connections()
            raise

    async def _safe(self, query: str, method: str, *args: Any) -> Any:
        """Run ``connection.<method>(query, *args)``.

        A safe query is tried twice if the connection is lost under it (see
        :data:`SAFE_QUERIES`).
        """
        tries = 2 if query in SAFE_QUERIES else 1
        for attempt in range(tries):
            try:
                async with self._connection() as connection:
                    return await getattr(connection, method)(QUERIES[query], *args)
            except errors.StoreError as exc:
                if attempt + 1 == tries or not connection_lost(exc):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _fetchrow(self, query: str, *args: Any) -> Row | None:
        return _row(await self._safe(query, "fetchrow", *args))

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
        PostgreSQL would return them without being read back (see :func:`_stored_task`).
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
            as_stored, again = _stored_task(row, names)
            if again:
                reread.append((len(stored), row[_ID]))
            stored.append(as_stored)
        if reread:
            json_columns = [n for n in names if n in _JSON_COLUMNS]
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

    async def top(self, *, heard_since: datetime, limit: int) -> dict[str, Any]:
        """Executors heard from lately, running and waiting tasks, counts by app and status."""
        row = await self._fetchrow("top", heard_since, limit)
        assert row is not None
        return {
            key: orjson.loads(value) if isinstance(value, str) else value
            for key, value in row.items()
        }

    async def unserved_apps(
        self, *, now: datetime, alive_since: datetime, limit: int | None
    ) -> list[Row]:
        """Apps with QUEUED tasks that no live executor serves: ``{app, queued, waiting_s}``."""
        async with self._connection() as connection:
            rows = await connection.fetch(QUERIES["unserved_apps"], now, alive_since, limit)
        return [dict(r) for r in rows]

    async def served_apps(self, *, alive_since: datetime) -> set[str]:
        """The apps live executors serve (heard from after ``alive_since``, not stopped)."""
        async with self._connection() as connection:
            rows = await connection.fetch(QUERIES["served_apps"], alive_since)
        return {r["app"] for r in rows}

    async def metrics(self, *, now: datetime, alive_since: datetime) -> Row:
        """Tasks by app and status, queue lag by app, live executors, events written, leader."""
        key = LEADER_LOCK_KEY
        row = await self._fetchrow("metrics", now, alive_since, key >> 32, key & 0xFFFFFFFF)
        assert row is not None
        return row

    # -- events -------------------------------------------------------------------------------

    async def events_after(
        self, cursor: tuple[str, int] | None, *, limit: int, snapshot: bool = False
    ) -> list[Row]:
        """Events after ``cursor`` (``(xid, id)``; None: the oldest kept), none missed.

        ``snapshot=True`` reads every committed event, for a one-off replay that is not
        followed afterwards (following needs the default, which waits for open transactions).
        """
        xid, event_id = cursor if cursor is not None else (None, None)
        rows = await self._safe("events_after", "fetch", xid, event_id, limit, snapshot)
        return [dict(r) for r in rows]

    async def event_cursor(self, event_id: int | None) -> tuple[str, int] | None:
        """The cursor after event ``event_id``, or after the newest event when None."""
        if event_id is None:
            row = await self._fetchrow("latest_event_cursor")
        else:
            row = await self._fetchrow("event_cursor", event_id)
            if row is None:
                raise errors.ValidationError(f"no event {event_id} is kept", field="after_id")
        return (row["xid"], row["id"]) if row is not None else None

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

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self._safe(query, "fetch", *args))

    async def _fetchval(self, query: str, *args: Any) -> Any:
        return await self._safe(query, "fetchval", *args)

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
    ) -> list[Row]:
        """Claim up to ``limit`` QUEUED tasks of ``apps`` (EXECUTED by ``executor_id``)."""
        if len(apps) == 1:  # the common case, with a plan PostgreSQL keeps
            rows = await self._fetch("claim_one", apps[0], executor_id, limit, now)
        else:
            rows = await self._fetch("claim", list(apps), executor_id, limit, now)
        return [dict(r) for r in rows]

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

    async def fail_tasks(self, items: Sequence[Mapping[str, Any]], *, now: datetime) -> list[Row]:
        """Fail or retry tasks; return ``[{id, status, executor_id}]`` of those that applied."""
        return [dict(r) for r in await self._fetch("fail_tasks", list(items), now)]

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

    async def orphans(self, executor_id: str, running: Sequence[str]) -> list[str]:
        """Return the claim ids ``executor_id`` holds in the database but does not run."""
        rows = await self._fetch("orphans", executor_id, list(running))
        return [r["claim_id"] for r in rows if r["claim_id"] is not None]

    async def task_status(self, ids: Sequence[str]) -> dict[str, Row]:
        """Return ``{id: {status, stage, executor_id}}`` for existing tasks."""
        return {r["id"]: dict(r) for r in await self._fetch("task_status", list(ids))}

    # -- manager ------------------------------------------------------------------------------

    async def queue_due(self, *, now: datetime, limit: int) -> int:
        """Queue due IDLE tasks and ended cron tasks at their fire time."""
        return int(await self._fetchval("queue_due", now, limit))

    async def release_timers(self, *, now: datetime, limit: int) -> int:
        """Resume tasks whose Timer is due."""
        return int(await self._fetchval("release_timers", now, limit))

    async def overdue(self, *, now: datetime, limit: int) -> list[Row]:
        """Return tasks past their run deadline or Message wait deadline."""
        return [dict(r) for r in await self._fetch("overdue", now, limit)]

    async def suspend_stale(
        self, *, now: datetime, silent_since: datetime | None, limit: int
    ) -> int:
        """Suspend tasks of executors silent since ``silent_since`` or offline."""
        return int(await self._fetchval("suspend_stale", now, silent_since, limit))

    async def requeue_suspended(self, *, now: datetime, limit: int) -> int:
        """Queue SUSPENDED tasks again at their stage."""
        return int(await self._fetchval("requeue_suspended", now, limit))

    async def debug_orphans(
        self, *, silent_since: datetime | None, limit: int, apps: Sequence[str] | None = None
    ) -> list[Row]:
        """Tasks waiting in debug queues that no live debug executor serves (see the query)."""
        rows = await self._fetch(
            "debug_orphans", limit, silent_since, list(apps) if apps is not None else None
        )
        return [dict(r) for r in rows]

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

    async def health(self, *, alive_since: datetime) -> dict[str, Any]:
        """Return ``{database, leader, executors}``.

        The database answered, whether a manager leads, and how many executors heartbeated
        since ``alive_since``.
        """
        key = LEADER_LOCK_KEY
        row = await self._fetchrow("health", key >> 32, key & 0xFFFFFFFF, alive_since)
        assert row is not None
        return {"database": True, "leader": row["leader"], "executors": row["executors"]}

    async def notify_cancel(self, runs: Sequence[str]) -> None:
        """Tell executors to abandon these runs (``"task_id claim_id"``)."""
        await self._fetchval("notify_cancel", list(runs))


LEADER_LOCK_KEY = 0x6B61696A7500  # arbitrary, fixed: the manager leadership advisory lock
GC_LOCK_KEY = LEADER_LOCK_KEY + 1
"""Leadership of managers that only collect garbage (``--disable-scheduler``), so that they
do not stand by behind a scheduling leader."""


class AdvisoryLeadership(base.Leadership):
    """Leadership held as a session advisory lock on a dedicated connection.

    If the leader dies or its connection drops, PostgreSQL releases the lock and a standby's
    next ``hold()`` takes it. The leader's duties run in that same session (:meth:`fenced`):
    a leader cut off from the database cannot act once the server has released its lock,
    since a statement that reaches the server late finds its session gone.
    """

    CHECK_TIMEOUT = 5.0
    """Seconds the leader waits for its lock's connection to answer before it steps down."""

    KEEPALIVE: ClassVar[Mapping[str, str]] = {
        # The server probes the leader's connection after 5 s of silence, every 2 s, and drops
        # it (releasing the lock to a standby) after 3 unanswered probes or 10 s of unacked
        # data, instead of the operating system's default of about two hours: a leader cut
        # off by the network must not keep the lock. Unix sockets ignore these.
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "10000",
    }

    def __init__(
        self, dsn: str, key: int = LEADER_LOCK_KEY, *, check_timeout: float | None = None
    ) -> None:
        self.dsn = dsn
        self.key = key
        self.check_timeout = self.CHECK_TIMEOUT if check_timeout is None else check_timeout
        self._connection: asyncpg.Connection | None = None

    async def hold(self) -> bool:
        """Take or keep the lock; False if another session holds it.

        The leader checks its connection at every call, within ``check_timeout``: a connection
        that stopped answering (a network cut leaves it half-open) is dropped and the manager
        steps down, rather than leading on a lock the server may already have released.
        """
        if self._connection is not None and not self._connection.is_closed():
            try:
                await self._connection.fetchval("SELECT 1", timeout=self.check_timeout)
                return True
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                self._connection.terminate()  # no goodbye on a connection that hangs
                self._connection = None
                return False  # step down now; the next call competes again
        with _translate():
            connection = await asyncpg.connect(
                self.dsn,
                timeout=self.check_timeout,
                server_settings={"application_name": "kaiju-tasks-leader", **self.KEEPALIVE},
            )
        try:
            got = await connection.fetchval("SELECT pg_try_advisory_lock($1)", self.key)
            if got:
                await init_connection(connection)  # the duties' JSON codecs
        except BaseException:
            await connection.close()
            raise
        if not got:
            await connection.close()
            return False
        self._connection = connection
        return True

    def fenced(self, store: base.EngineStore) -> base.EngineStore:
        """A store over the lock's own session: its statements run only while the lock holds."""
        return PostgresEngineStore(_LockSession(self))

    async def release(self) -> None:
        """Close the lock's connection, which releases it."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None


class _LockSession:
    """The leadership's connection seen as a pool of one (what the store needs of a pool)."""

    def __init__(self, leadership: AdvisoryLeadership) -> None:
        self._leadership = leadership

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        connection = self._leadership._connection
        if connection is None or connection.is_closed():
            # Not the leader (any more): the duty is not run anywhere else.
            raise asyncpg.InterfaceError("the leadership's connection is closed")
        yield connection

    async def expire_connections(self) -> None:
        """Nothing to expire: the next ``hold()`` finds a lost connection and steps down."""
