"""Through PgBouncer in transaction mode, the session work goes over the direct DSN.

A TaskRuntime is given PgBouncer's DSN and the direct one (``direct_dsn``). Its store's pool
reaches PostgreSQL through PgBouncer's server connections, while LISTEN and the leadership's
advisory lock must sit on connections of this process straight to PostgreSQL: a LISTEN or a
session lock on a pooled server connection would be lost, or held for another client, at the
end of the transaction. Which backend is whose is read from ``pg_stat_activity``: a backend
whose client port is the local port of one of this process's sockets to PostgreSQL is a direct
connection; PgBouncer's own server connections are not sockets of this process.

The executor polls once an hour, so a task created through PgBouncer after the first claim
can only be started by the notification its insert sends (it runs in a transaction on a pooled
connection; PostgreSQL delivers it at commit to the direct LISTEN).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import psutil
import pytest

from kaiju_tasks import Task, TaskCommand, TaskRuntime
from kaiju_tasks.store import locks
from kaiju_tasks.testing import eventually
from tests import pgbouncer

pytestmark = pytest.mark.timeout(120)

HOUR = timedelta(hours=1)
WITHIN = 30.0
"""Seconds a task may take to finish: generous, since what is shown is that it finishes at all
(the poll would take an hour)."""


def _direct_ports(server_port: int) -> set[int]:
    """Local ports of this process's TCP sockets to PostgreSQL (``server_port``)."""
    return {
        c.laddr.port
        for c in psutil.Process().net_connections(kind="tcp")
        if getattr(c.raddr, "port", None) == server_port  # () while unconnected
    }


async def _backends(dsn: str) -> list[dict[str, Any]]:
    """The other client backends of the test database: pid, application_name, client_port,
    the last query, and whether it holds the manager leadership lock."""
    classid, objid = locks.halves(locks.LEADER_LOCK_KEY)
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            """
            SELECT a.pid, a.application_name, a.client_port, a.query,
                   EXISTS (SELECT 1 FROM pg_locks l
                           WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted
                             AND l.classid = $1 AND l.objid = $2 AND l.objsubid = 1) AS leader
            FROM pg_stat_activity a
            WHERE a.datname = current_database() AND a.backend_type = 'client backend'
              AND a.pid <> pg_backend_pid()
            """,
            classid,
            objid,
        )
    finally:
        await connection.close()
    return [dict(r) for r in rows]


@pytest.fixture
async def runtime(dsn: str) -> AsyncIterator[TaskRuntime]:
    """A runtime whose pool goes through PgBouncer and whose loops wake by notification only."""
    with pgbouncer.pgbouncer(dsn) as pooled:
        runtime = TaskRuntime(
            pooled,
            direct_dsn=dsn,
            apps=["shop"],
            manager_options={"interval": HOUR},
            executor_options={"poll_interval": HOUR},
        )

        @runtime.methods.register("shop.ok")
        async def ok(n: int = 0) -> int:
            return n

        async with runtime:
            yield runtime


async def _finished(runtime: TaskRuntime, task_id: str) -> None:
    async def finished() -> bool:
        task = await runtime.tasks.get(task_id)
        assert task["status"] in ("QUEUED", "EXECUTED", "FINISHED"), task
        return bool(task["status"] == "FINISHED")

    await eventually(finished, within=WITHIN, interval=0.05, what=f"task {task_id} finished")


async def _create(runtime: TaskRuntime, n: int) -> str:
    created = await runtime.tasks.create(
        Task(app="shop", commands=[TaskCommand(method="shop.ok", params={"n": n})])
    )
    assert isinstance(created, dict)
    task_id: str = created["id"]
    return task_id


async def test_listen_and_the_leadership_lock_connect_directly(
    runtime: TaskRuntime, dsn: str
) -> None:
    server_port = urlsplit(dsn).port or 5432
    assert runtime.store is not None
    async with runtime.store.pool.acquire() as pooled:
        pooled_pid = await pooled.fetchval("SELECT pg_backend_pid()")

    async def leading() -> list[dict[str, Any]] | None:
        backends = await _backends(dsn)
        return backends if any(b["leader"] for b in backends) else None

    backends = await eventually(leading, within=WITHIN, interval=0.05, what="a leader")
    direct = _direct_ports(server_port)
    by_pid = {b["pid"]: b for b in backends}

    # The pool's statements run on a server connection PgBouncer opened, not one of ours.
    assert by_pid[pooled_pid]["client_port"] not in direct, by_pid[pooled_pid]
    # The leadership lock is held on a direct connection of this process.
    leaders = [b for b in backends if b["leader"]]
    assert len(leaders) == 1, leaders
    assert leaders[0]["client_port"] in direct, leaders
    assert leaders[0]["application_name"] == "kaiju-tasks-leader"
    # Every LISTEN was sent on a direct connection, and the executor's listener is among them.
    listeners = [b for b in backends if b["query"].startswith("LISTEN")]
    assert listeners, backends
    assert all(b["client_port"] in direct for b in listeners), listeners
    assert "kaiju-tasks-listener" in {b["application_name"] for b in listeners}
    # No pooled server connection kept a session lock or a LISTEN of ours.
    pooled_backends = [b for b in backends if b["client_port"] not in direct]
    assert pooled_backends
    assert not [b for b in pooled_backends if b["leader"] or b["query"].startswith("LISTEN")]


async def test_a_task_created_through_pgbouncer_wakes_the_executor(runtime: TaskRuntime) -> None:
    # The first task may be claimed by the executor's first claim on start.
    await _finished(runtime, await _create(runtime, 1))
    executor = runtime.executor
    assert executor is not None
    # The executor is back to its hour-long wait: no run, no claim out (after a short claim,
    # only a notification wakes it).
    await eventually(lambda: executor.active == 0 and not executor._claim_lock.locked())
    # This one only by the NOTIFY of its insert, which went through PgBouncer.
    await _finished(runtime, await _create(runtime, 2))
