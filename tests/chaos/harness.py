"""Load and bookkeeping shared by the fault tests: a JSON-RPC target that records its calls."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from kaiju_tasks import Task, TaskCommand
from kaiju_tasks.store import migrate
from tests import rpc_fake

APP = "chaos"


def _echo(call: rpc_fake.Call) -> Any:
    return call.params or {}


@contextlib.asynccontextmanager
async def counting_target(
    delay: float = 0.0, host: str = "127.0.0.1"
) -> AsyncIterator[rpc_fake.RpcTarget]:
    """A started JSON-RPC target on ``host`` that records each call and echoes its params.

    Each call waits ``delay`` seconds; ``done_at`` holds when each was answered.
    """
    async with rpc_fake.running(_echo, delay=delay, host=host) as target:
        yield target


def three_stage_task(n: int) -> Task:
    """A task of three remote stages, each reading the previous one's result."""
    return Task(
        app=APP,
        commands=[
            TaskCommand(method="chaos.a", params={"n": n}),
            TaskCommand(method="chaos.b", params={"n": "[0.n]"}),
            TaskCommand(method="chaos.c", params={"n": "[1.n]"}),
        ],
    )


async def migrated_database(server_dsn: str, name: str = "kaiju") -> str:
    """Create database ``name`` on the server of ``server_dsn``, migrate it, return its DSN."""
    connection = await asyncpg.connect(server_dsn)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    dsn = server_dsn.rsplit("/", 1)[0] + f"/{name}"
    await migrate.migrate(dsn)
    return dsn


async def counts(dsn: str) -> dict[str, int]:
    """Tasks by status, read on a connection of its own (None while the server is down)."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch("SELECT status, count(*) AS n FROM tasks GROUP BY status")
    finally:
        await connection.close()
    return {r["status"]: r["n"] for r in rows}


async def all_finished(dsn: str, ids: int | list[str]) -> bool:
    """Whether every task is FINISHED: none left unfinished, and all of ``ids`` FINISHED.

    ``ids``: the tasks whose create was acknowledged (or how many tasks there must be). A
    create whose reply was lost (the database restarted after its commit) may have stored
    tasks the caller never heard of: they must finish too, but are not counted.
    False while the database is unreachable.
    """
    try:
        connection = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    try:
        if isinstance(ids, int):
            row = await connection.fetchrow(
                "SELECT count(*) FILTER (WHERE status <> 'FINISHED') AS left,"
                " count(*) AS acknowledged FROM tasks"
            )
            total = ids
        else:
            row = await connection.fetchrow(
                "SELECT count(*) FILTER (WHERE status <> 'FINISHED') AS left,"
                " count(*) FILTER (WHERE id = ANY($1::text[])) AS acknowledged FROM tasks",
                ids,
            )
            total = len(set(ids))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    finally:
        await connection.close()
    return bool(row["left"] == 0 and row["acknowledged"] == total)


def stage_calls(target: rpc_fake.RpcTarget, task_ids: list[str]) -> dict[str, int]:
    """Calls per task id (each task makes three when every stage ran once)."""
    per_task = Counter(call.task_id for call in target.calls)
    return {t: per_task[t] for t in task_ids}


def unexplained_twice(target: rpc_fake.RpcTarget, explained: set[str]) -> dict[str, int]:
    """Request ids called more than once whose task is not among ``explained`` (those a
    fault hit while they ran: their stage may run again, with the same request id)."""
    return {rid: n for rid, n in target.twice().items() if rid.rsplit(":", 3)[0] not in explained}


def result_of(row: Any) -> Any:
    """The last stage's result of a finished three-stage task."""
    return row["result"][-1]
