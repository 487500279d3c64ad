"""Chaos under steady load: three-stage tasks whose remote calls count themselves.

Each scenario runs its own private cluster, two executor and two manager processes of the CLI,
and a stream of task creates; then it injects one kind of fault. Afterwards every task must be
FINISHED, none stuck, and no request id called twice except where a SIGKILL hit that very call.
The seconds from the fault's end to full throughput are printed (``-s`` shows them); the figures
of docs/reliability.md come from::

    KAIJU_TASKS_CHAOS_LONG=1 pytest -m chaos -s tests/chaos

The default (CI) form is bounded: shorter outages and fewer kills, named in each scenario.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kaiju_tasks.service import TaskService
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import eventually
from tests import rpc_fake
from tests.chaos import cluster as cluster_
from tests.chaos import harness

LONG = os.environ.get("KAIJU_TASKS_CHAOS_LONG") == "1"
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1800 if LONG else 240)]

RATE = 40  # tasks created per second
STALE_AFTER = "3"


class Proc:
    """A kaiju-tasks CLI process (executor or manager) with its output in a file."""

    def __init__(self, tmp: Path, name: str, dsn: str, args: tuple[str, ...]) -> None:
        self.name, self.dsn, self.args, self.tmp = name, dsn, args, tmp
        self.starts = 0
        self.process = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        with (self.tmp / f"{self.name}-{self.starts}.log").open("wb") as log:
            return self._popen(log)

    def _popen(self, log: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kaiju_tasks.cli",
                "--dsn",
                self.dsn,
                "--log-level",
                "WARNING",
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def restart(self) -> None:
        self.process = self._spawn()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Run:
    """One scenario's cluster, processes, load and measurements."""

    def __init__(
        self, cluster: cluster_.Cluster, dsn: str, target: rpc_fake.RpcTarget, tmp: Path
    ) -> None:
        self.cluster, self.dsn, self.target, self.tmp = cluster, dsn, target, tmp
        self.ids: list[str] = []
        self.procs: list[Proc] = []
        self.killed_tasks: set[str] = set()  # tasks a SIGKILLed executor held when it died

    def start_processes(self) -> None:
        for name in ("A", "B"):
            self.procs.append(
                Proc(
                    self.tmp,
                    f"executor-{name}",
                    self.dsn,
                    (
                        "executor",
                        "--app",
                        f"{harness.APP}={self.target.url}",
                        "--id",
                        name,
                        "--heartbeat",
                        "1",
                        "--poll",
                        "0.2",
                        "--shutdown-grace",
                        "1",
                    ),
                )
            )
        for name in ("1", "2"):
            self.procs.append(
                Proc(
                    self.tmp,
                    f"manager-{name}",
                    self.dsn,
                    (
                        "manager",
                        "--interval",
                        "0.2",
                        "--stale-after",
                        STALE_AFTER,
                        "--standby-interval",
                        "0.5",
                    ),
                )
            )

    async def load(self, service: TaskService) -> None:
        n = 0
        while True:
            started = time.monotonic()
            try:
                created = await service.create(
                    [harness.three_stage_task(i) for i in range(n, n + RATE // 10)],
                    columns=["id"],
                )
            except Exception:  # noqa: BLE001 - the database is the fault; try again
                await asyncio.sleep(0.2)
                continue
            assert isinstance(created, list)
            self.ids += [t["id"] for t in created]
            n += RATE // 10
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))

    def throughput(self, since: float, until: float) -> float:
        return sum(since <= t < until for t in self.target.done_at) / (until - since)

    async def recovery(self, fault_end: float, baseline: float) -> float:
        """Seconds from ``fault_end`` to the first 1 s window at 80% of ``baseline``."""

        def recovered() -> float | None:
            t = fault_end
            while t + 1 <= time.monotonic():
                if self.throughput(t, t + 1) >= 0.8 * baseline:
                    return max(t + 1 - fault_end, 0.001)
                t += 0.1
            return None

        seconds: float = await eventually(recovered, within=120, interval=0.2, what="throughput")
        return seconds


async def _kill_backends(run: Run) -> None:
    connection = await asyncpg.connect(run.cluster.dsn())
    try:
        await connection.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = 'kaiju' AND application_name LIKE 'kaiju-tasks%'"
        )
    finally:
        await connection.close()


async def restart(run: Run) -> None:
    for _ in range(3):
        await asyncio.to_thread(run.cluster.restart)
        await asyncio.sleep(2)


async def terminate_backends(run: Run) -> None:
    for _ in range(5):
        await _kill_backends(run)
        await asyncio.sleep(1)


async def outage(run: Run) -> None:
    await asyncio.to_thread(run.cluster.stop)
    await asyncio.sleep(45 if LONG else 15)
    await asyncio.to_thread(run.cluster.start)


async def sigkill(run: Run) -> None:
    rng = random.Random(7)
    for _ in range(100 if LONG else 15):
        proc = rng.choice(run.procs)
        proc.kill()
        if proc.name.startswith("executor-"):
            # What the dead process held: a stage it called may have been answered without its
            # result being committed, and then runs again (with the same request id).
            connection = await asyncpg.connect(run.dsn)
            try:
                rows = await connection.fetch(
                    "SELECT id FROM tasks WHERE status = 'EXECUTED' AND executor_id = $1",
                    proc.name.removeprefix("executor-"),
                )
            finally:
                await connection.close()
            run.killed_tasks |= {r["id"] for r in rows}
        proc.restart()
        await asyncio.sleep(rng.uniform(1, 2))


async def idle_in_transaction(run: Run) -> None:
    connection = await asyncpg.connect(run.dsn)
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.fetch("SELECT * FROM tasks LIMIT 10 FOR UPDATE")
        await asyncio.sleep(60 if LONG else 20)
        await transaction.rollback()
    finally:
        await connection.close()


SCENARIOS: dict[str, Callable[[Run], Awaitable[None]]] = {
    "restart": restart,
    "terminate_backends": terminate_backends,
    "outage": outage,
    "sigkill": sigkill,
    "idle_in_transaction": idle_in_transaction,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_chaos(scenario: str, tmp_path: Path) -> None:
    with cluster_.private_cluster() as cluster:
        dsn = await harness.migrated_database(cluster.dsn())
        async with harness.counting_target(delay=0.02) as target:
            run = Run(cluster, dsn, target, tmp_path)
            pool = await postgres.create_pool(dsn, max_size=4, application_name="chaos-load")
            service = TaskService(postgres.PostgresTaskStore(pool))
            try:
                run.start_processes()
                load = asyncio.create_task(run.load(service))
                try:
                    await eventually(lambda: len(target.done_at) > 100, within=60, what="load")
                    warm = time.monotonic()
                    await asyncio.sleep(3)  # the baseline window
                    # Full throughput: what the load asks for (three calls a task), or what the
                    # processes did before the fault if that is less.
                    baseline = min(run.throughput(warm, warm + 3), 3.0 * RATE)
                    await SCENARIOS[scenario](run)
                    fault_end = time.monotonic()
                    recovery = await run.recovery(fault_end, baseline)
                finally:
                    load.cancel()
                    await asyncio.gather(load, return_exceptions=True)
                try:
                    await eventually(
                        lambda: harness.all_finished(dsn, run.ids),
                        within=180,
                        what="every task FINISHED",
                    )
                except AssertionError as exc:
                    raise AssertionError(f"{exc}: by status {await _counts(dsn)}") from None
            except BaseException:
                _print_logs(run)
                raise
            finally:
                for proc in run.procs:
                    proc.stop()
                await pool.close()
    twice = target.twice()
    unexplained = harness.unexplained_twice(target, run.killed_tasks)
    print(  # noqa: T201 - the figures of docs/reliability.md
        f"\nchaos {scenario}: {len(run.ids)} tasks, baseline {baseline:.0f} calls/s,"
        f" recovered in {recovery:.1f} s, {len(twice)} calls twice"
        f" ({len(twice) - len(unexplained)} of tasks a kill hit)"
    )
    assert unexplained == {}
    calls = harness.stage_calls(target, run.ids)
    assert min(calls.values()) >= 3


async def _counts(dsn: str) -> dict[str, int] | str:
    try:
        return await harness.counts(dsn)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return f"unreachable: {exc}"


def _print_logs(run: Run) -> None:
    """The processes' logs, for the failure report (pytest shows captured output)."""
    for log in sorted(run.tmp.glob("*.log")):
        text = log.read_text(errors="replace")
        print(f"==== {log.name}\n{text[-4000:]}")  # noqa: T201 - the failure's evidence
