"""Load and bookkeeping shared by the fault tests: a JSON-RPC target that counts its calls."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from aiohttp import web

from kaiju_tasks import Task, TaskCommand
from kaiju_tasks.store import migrate

APP = "chaos"


class CountingTarget:
    """A JSON-RPC app on loopback; counts the calls of each request id and when they ended."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.url = ""
        self.port = 0
        self.calls: Counter[str] = Counter()
        self.arrivals: list[tuple[float, str, str]] = []  # (monotonic time, peer, request id)
        self.done_at: list[float] = []  # monotonic times of answered calls
        self.in_flight: Counter[str] = Counter()  # request ids being answered now
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls[body["id"]] += 1
        self.arrivals.append((time.monotonic(), request.remote or "", body["id"]))
        self.in_flight[body["id"]] += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight[body["id"]] -= 1
            if not self.in_flight[body["id"]]:
                del self.in_flight[body["id"]]
        self.done_at.append(time.monotonic())
        params = body.get("params") or {}
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": params})

    async def start(self, host: str = "127.0.0.1") -> None:
        """Listen on ``host`` (``0.0.0.0`` for network namespaces to reach it)."""
        app = web.Application()
        app.router.add_post("/rpc", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}/rpc"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def twice(self) -> dict[str, int]:
        """Request ids called more than once."""
        return {rid: n for rid, n in self.calls.items() if n > 1}


@contextlib.asynccontextmanager
async def counting_target(
    delay: float = 0.0, host: str = "127.0.0.1"
) -> AsyncIterator[CountingTarget]:
    """A started :class:`CountingTarget` listening on ``host``."""
    target = CountingTarget(delay)
    await target.start(host)
    try:
        yield target
    finally:
        await target.close()


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


def stage_calls(target: CountingTarget, task_ids: list[str]) -> dict[str, int]:
    """Calls per task id (each task makes three when every stage ran once)."""
    per_task: Counter[str] = Counter()
    for rid, n in target.calls.items():
        per_task[rid.rsplit(":", 3)[0]] += n
    return {t: per_task[t] for t in task_ids}


def unexplained_twice(target: CountingTarget, explained: set[str]) -> dict[str, int]:
    """Request ids called more than once whose task is not among ``explained`` (those a
    fault hit while they ran: their stage may run again, with the same request id)."""
    return {rid: n for rid, n in target.twice().items() if rid.rsplit(":", 3)[0] not in explained}


def result_of(row: Any) -> Any:
    """The last stage's result of a finished three-stage task."""
    return row["result"][-1]
