"""Crash recovery with real processes: the CLI's executor and manager as subprocesses, a real
JSON-RPC target over HTTP on loopback, SIGKILL, and dropped database connections."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from kaiju_tasks import Task, TaskCommand, Timer
from kaiju_tasks.testing import eventually
from tests import rpc_fake

pytestmark = pytest.mark.timeout(120)


class Proc:
    """A kaiju-tasks CLI subprocess with its output in files."""

    def __init__(self, tmp_path: Path, name: str, dsn: str, *args: str) -> None:
        self.name = name
        self.out = tmp_path / f"{name}.out"
        self.err = tmp_path / f"{name}.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kaiju_tasks.cli",
                    "--dsn",
                    dsn,
                    "--log-level",
                    "INFO",
                    *args,
                ],
                stdout=out,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    async def wait_for_output(self, text: str, within: float = 20.0) -> None:
        deadline = time.monotonic() + within
        while True:
            if text in self.output():
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} never printed {text!r}:\n{self.output()}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def procs(tmp_path, dsn):
    started: list[Proc] = []

    def start(name, *args):
        proc = Proc(tmp_path, name, dsn, *args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def gate():
    """Set to let the ``slow`` stage answer."""
    return asyncio.Event()


@pytest.fixture
async def target(rpc_target, gate):
    """The app: ``step`` adds one to ``x``, ``slow`` waits for the gate, the rest take 2 ms."""

    async def answer(call: rpc_fake.Call) -> Any:
        if call.method == "slow":
            await gate.wait()
            return "slow-done"
        if call.method == "step":
            return {"x": call.params["x"] + 1}
        await asyncio.sleep(0.002)
        return None

    return await rpc_target(answer)


def executor_args(target, name):
    return (
        "executor",
        "--app",
        f"crash={target.url}",
        "--id",
        name,
        "--heartbeat",
        "0.2",
        "--poll",
        "0.1",
        "--shutdown-grace",
        "1",
    )


MANAGER_ARGS = ("manager", "--interval", "0.2", "--stale-after", "1.5", "--standby-interval", "0.3")


async def test_executor_killed_mid_stage_is_resumed_at_that_stage_by_another(
    procs, target, gate, task_service, store
):
    a = procs("executor-a", *executor_args(target, "A"))
    await a.wait_for_output("executor running")
    manager = procs("manager", *MANAGER_ARGS)
    await manager.wait_for_output("manager running")
    task = await task_service.create(
        Task(
            app="crash",
            commands=[
                TaskCommand(method="step", params={"x": 1}),
                TaskCommand(method="slow"),
                TaskCommand(method="step", params={"x": "[0.x]"}),
            ],
        )
    )
    await eventually(lambda: target.called("slow"), what="the slow stage to start")
    before = await store.get_task(task["id"])
    assert (before["status"], before["stage"], before["result"]) == ("EXECUTED", 1, [{"x": 2}])
    a.kill()
    gate.set()
    b = procs("executor-b", *executor_args(target, "B"))
    await b.wait_for_output("executor running")
    await eventually(lambda: _finished(store, task["id"]), what="the task to finish")
    row = await store.get_task(task["id"])
    assert row["result"] == [{"x": 2}, "slow-done", {"x": 3}]
    assert row["exit_code"] == 0
    assert len(target.called("step")) == 2  # stage 0 was not run again
    slow_ids = [c.id for c in target.called("slow")]
    assert len(slow_ids) == 2
    assert slow_ids[0] == slow_ids[1] == f"{row['id']}:{row['job_id']}:1:0"


async def _finished(store, task_id):
    return (await store.get_task(task_id))["status"] in ("FINISHED", "FAILED")


async def test_standby_manager_takes_over_when_the_leader_is_killed(
    procs, target, task_service, store
):
    ex = procs("executor", *executor_args(target, "E"))
    leader = procs("manager-1", *MANAGER_ARGS)
    await leader.wait_for_output("leader_elected")
    standby = procs("manager-2", *MANAGER_ARGS)
    await standby.wait_for_output("manager running")
    await ex.wait_for_output("executor running")
    assert "leader_elected" not in standby.output()
    task = await task_service.create(
        Task(
            app="crash",
            commands=[
                TaskCommand(method="step", params={"x": 1}),
                Timer(2),
                TaskCommand(method="step", params={"x": "[0.x]"}),
            ],
        )
    )
    await eventually(lambda: _is(store, task["id"], "WAITING"), what="the timer to start")
    leader.kill()
    await standby.wait_for_output("leader_elected", within=10)
    await eventually(lambda: _finished(store, task["id"]), what="the task to finish")
    row = await store.get_task(task["id"])
    assert (row["status"], row["result"]) == ("FINISHED", [{"x": 2}, None, {"x": 3}])


async def _is(store, task_id, wanted):
    return (await store.get_task(task_id))["status"] == wanted


async def test_two_executor_processes_never_run_a_task_twice_and_lose_none(
    procs, target, task_service, store
):
    for name in ("A", "B"):
        await procs(f"executor-{name}", *executor_args(target, name)).wait_for_output(
            "executor running"
        )
    created = await task_service.create(
        [Task(app="crash", commands=[TaskCommand(method="noop")]) for _ in range(1000)],
        columns=["id"],
    )
    ids = {t["id"] for t in created}

    async def all_finished():
        page = await task_service.list(conditions={"status": "FINISHED"}, limit=1)
        return page["count"] == len(ids)

    await eventually(all_finished, within=90, what="1,000 tasks to finish")
    per_task = Counter(c.task_id for c in target.called("noop"))
    assert set(per_task) == ids
    assert max(per_task.values()) == 1
    assert max(target.max_in_flight.values()) == 1
    executors = {
        r["executor_id"]
        for r in (
            await task_service.list(
                conditions={"status": "FINISHED"}, columns=["executor_id"], limit=1000
            )
        )["data"]
    }
    assert executors <= {"A", "B"}


async def test_dropped_database_connections_lose_no_task(
    procs, target, task_service, store, server_dsn, dsn
):
    ex = procs("executor", *executor_args(target, "E"))
    await ex.wait_for_output("executor running")
    manager = procs("manager", *MANAGER_ARGS)
    await manager.wait_for_output("manager running")
    database = urlsplit(dsn).path.lstrip("/")
    ids = []
    for round_ in range(5):
        created = await task_service.create(
            [
                Task(
                    app="crash",
                    commands=[
                        TaskCommand(method="step", params={"x": i}),
                        TaskCommand(method="step", params={"x": "[0.x]"}),
                    ],
                )
                for i in range(100)
            ],
            columns=["id"],
        )
        ids += [t["id"] for t in created]
        await asyncio.sleep(0.05 * round_)
        admin = await asyncpg.connect(server_dsn)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = $1 AND application_name LIKE 'kaiju-tasks%'",
                database,
            )
        finally:
            await admin.close()
        assert killed > 0

    async def all_finished():
        try:
            page = await task_service.list(conditions={"status": "FINISHED"}, limit=1)
        except Exception:  # noqa: BLE001 - our own pool lost connections too
            return False
        return page["count"] == len(ids)

    await eventually(all_finished, within=60, what="every task to finish")
    rows = await task_service.list(conditions={"id": ids}, columns=["result"], limit=1000)
    assert all(len(r["result"]) == 2 for r in rows["data"])
    assert ex.process.poll() is None
    assert manager.process.poll() is None
