"""The asyncpg driver: the pool and its codecs, driver errors, and the named-query runner.

Every PostgreSQL store of ``store/`` (tasks and engine in ``postgres.py``, the read side in
``insights.py``, the leadership lock in ``leadership.py``) opens its connections and runs its
named queries through here, so a driver error becomes a ``StoreError`` in one place and a lost
connection is handled the same way everywhere.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson

from kaiju_tasks import defaults, errors, logs, redact
from kaiju_tasks.store import copy
from kaiju_tasks.store.queries import QUERIES

Row = dict[str, Any]

DEFAULT_POOL_MIN = defaults.POOL_MIN
DEFAULT_POOL_MAX = defaults.POOL_MAX


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
    ``fetchrow``, ``fetchval`` and ``execute`` with arguments share (asyncpg 0.29 to 0.32);
    ``tests/integration/test_driver_pooler.py`` fails if asyncpg stops calling it.
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
def translate() -> Any:
    """Raise driver errors as ``StoreError`` subclasses (the driver error as ``__cause__``)."""
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
        "task_counts",
        "queue_lag",
        "cluster",
        "workers",
        "active_tasks",
        "throughput",
        "timeline",
        "raw_task",
        "unserved_apps",
        "served_apps",
        "events_after",
        "event_cursor",
        "latest_event_cursor",
        "ended_counts",
        "task_status",
        "orphans",
        "overdue",
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


def as_rows(records: list[asyncpg.Record]) -> list[Any]:
    """Records as dicts (typed by the caller: the rows of a named query have known columns)."""
    return [dict(r) for r in records]


def as_row(record: asyncpg.Record | None) -> Row | None:
    """A record as a dict, None as None."""
    return dict(record) if record is not None else None


class Queries:
    """Runs the named queries of ``queries.sql`` on a pool (or anything with its ``acquire``)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            with translate():
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
        return as_row(await self._safe(query, "fetchrow", *args))

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self._safe(query, "fetch", *args))

    async def _fetchval(self, query: str, *args: Any) -> Any:
        return await self._safe(query, "fetchval", *args)
