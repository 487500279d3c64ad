"""Chaos under steady load: three-stage tasks whose remote calls count themselves.

Each scenario runs its own private cluster, two executor and two manager processes of the CLI,
and a stream of task creates; then it injects one kind of fault. Afterwards:

- every task is FINISHED, none stuck;
- each task called exactly three request ids, one per stage, and a request id was called again
  only where a SIGKILL hit that very call (made before the kill, its result not committed when
  the executor died): see :func:`harness.check_calls`;
- throughput was back within ``RECOVERY_BOUND`` of each fault's end (the moment the restart,
  the termination, the kill or the outage was over), measured for each fault;
- no run was taken from an executor that was alive (no ``executor lost`` rescue) unless
  processes were killed; after the outage, each component logged the loss once, reminders
  without tracebacks, and its end once.

The figures are printed (``-s``) and written as JSON to the test's tmp dir and, if
``KAIJU_TASKS_CHAOS_REPORT`` names a file, into it. The default (CI) form is bounded: shorter
outages and fewer kills, named in each scenario; ``KAIJU_TASKS_CHAOS_LONG=1`` runs the long
form (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kaiju_tasks import logs as logs_
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
OUTAGE = 45.0 if LONG else 15.0  # seconds the server is down in the outage scenario
IDLE = 60.0 if LONG else 20.0  # seconds the idle-in-transaction session holds its locks
IDLE_BURST = 40  # tasks created at once, some of them still QUEUED when locked
RECOVERY_BOUND = 60.0  # seconds from a fault's end to full throughput, at most
# "<date> <time> WARNING <logger>: <component>: database still unreachable after N s ..."
REMINDER = re.compile(r"(?m)^\S+ \S+ [A-Z]+ \S+: (.+?): database still unreachable after (\d+) s")


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
        self.faults: list[harness.Fault] = []
        self.locked: list[str] = []  # tasks the idle-in-transaction session locked
        self.service: TaskService | None = None
        self._n = 0

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

    async def create(self, count: int) -> list[str]:
        """Create ``count`` three-stage tasks; their ids (kept in ``ids``)."""
        assert self.service is not None
        created = await self.service.create(
            [harness.three_stage_task(i) for i in range(self._n, self._n + count)],
            columns=["id"],
        )
        assert isinstance(created, list)
        self._n += count
        ids = [t["id"] for t in created]
        self.ids += ids
        return ids

    async def load(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.create(RATE // 10)
            except Exception:  # noqa: BLE001 - the database is the fault; try again
                await asyncio.sleep(0.2)
                continue
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))

    def throughput(self, since: float, until: float) -> float:
        return sum(since <= t < until for t in self.target.done_at) / (until - since)

    def recovered(self, fault_end: float, baseline: float) -> float | None:
        """Seconds from ``fault_end`` to the end of the first 1 s window (moving by 0.1 s)
        that ran at 80% of ``baseline``; None if there is none yet."""
        t = fault_end
        while t + 1 <= time.monotonic():
            if self.throughput(t, t + 1) >= 0.8 * baseline:
                return t + 1 - fault_end
            t += 0.1
        return None

    async def recoveries(self, baseline: float) -> list[float]:
        """Seconds to full throughput after each fault (waiting, at most RECOVERY_BOUND after
        the last one, until every fault has one)."""
        found: list[float | None] = []

        def all_recovered() -> bool:
            found[:] = [self.recovered(f.ended, baseline) for f in self.faults]
            return all(r is not None for r in found)

        await eventually(
            all_recovered,
            within=RECOVERY_BOUND + 1,
            interval=0.2,
            what=f"throughput back within {RECOVERY_BOUND:g} s of every fault",
        )
        return [r for r in found if r is not None]  # all of them: eventually() checked


async def _kill_backends(run: Run) -> int:
    """Terminate every backend of the product; return how many were terminated."""
    connection = await asyncpg.connect(run.cluster.dsn())
    try:
        killed: int = await connection.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = 'kaiju' AND application_name LIKE 'kaiju-tasks%'"
        )
    finally:
        await connection.close()
    return killed


def _fault(kind: str, started: float, detail: str = "", **kwargs: Any) -> harness.Fault:
    """A fault that ended now."""
    return harness.Fault(kind, started, time.monotonic(), harness.wall(), detail=detail, **kwargs)


async def restart(run: Run) -> None:
    for _ in range(3):
        started = time.monotonic()
        await asyncio.to_thread(run.cluster.restart)
        run.faults.append(_fault("pg_ctl restart -m fast", started))
        await asyncio.sleep(2)


async def terminate_backends(run: Run) -> None:
    for _ in range(5):
        started = time.monotonic()
        killed = await _kill_backends(run)
        run.faults.append(_fault("pg_terminate_backend", started, f"{killed} backends"))
        # Two executors and two managers: each has a pool, a listener, the leader a lock.
        assert killed >= 1, "a round terminated no backend of the product"
        await asyncio.sleep(1)


async def outage(run: Run) -> None:
    started = time.monotonic()
    await asyncio.to_thread(run.cluster.stop)
    await asyncio.sleep(OUTAGE)
    await asyncio.to_thread(run.cluster.start)
    run.faults.append(_fault("server stopped", started, f"{OUTAGE:g} s down"))


async def sigkill(run: Run) -> None:
    rng = random.Random(7)
    for _ in range(100 if LONG else 15):
        proc = rng.choice(run.procs)
        started = time.monotonic()
        # In a thread: the stage service keeps reading what the process sent before it died.
        await asyncio.to_thread(proc.kill)
        dead_at = harness.wall()
        hit: frozenset[tuple[str, int]] = frozenset()
        if proc.name.startswith("executor-"):
            # What the dead process held, each run at the stage whose result it had not
            # committed: the call it made for that stage may run again (same request id).
            hit = await harness.held(run.dsn, proc.name.removeprefix("executor-"))
        proc.restart()
        run.faults.append(
            harness.Fault("SIGKILL", started, time.monotonic(), dead_at, hit=hit, detail=proc.name)
        )
        await asyncio.sleep(rng.uniform(1, 2))


async def idle_in_transaction(run: Run) -> None:
    """A session idle in its transaction: it holds the xmin horizon (an xid of its own) and
    row locks on tasks waiting in the queue, so the claims skip them until it ends."""
    connection = await asyncpg.connect(run.dsn)
    try:
        for _ in range(50):
            # A burst of creates leaves some QUEUED for a moment: lock what is still there.
            created = await run.create(IDLE_BURST)
            transaction = connection.transaction()
            await transaction.start()
            rows = await connection.fetch(
                "SELECT id FROM tasks WHERE id = ANY($1::text[]) AND status = 'QUEUED'"
                " FOR UPDATE SKIP LOCKED",
                created,
            )
            if rows:
                break
            await transaction.rollback()
        else:
            raise AssertionError("no QUEUED task to lock in 50 bursts")
        locked = [r["id"] for r in rows]
        xid = await connection.fetchval("SELECT pg_current_xact_id()::text")
        started = time.monotonic()
        await asyncio.sleep(IDLE)
        # The locked tasks waited all along: the claims skip them, nothing else may run them.
        waiting = await harness.statuses(run.dsn, locked)
        await transaction.rollback()
        run.faults.append(
            _fault(
                "idle in transaction",
                started,
                f"{len(locked)} QUEUED tasks locked, xid {xid}, {IDLE:g} s",
            )
        )
        run.locked = locked
        assert set(waiting.values()) == {"QUEUED"}, waiting
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
            run.service = TaskService(postgres.PostgresTaskStore(pool))
            began = time.monotonic()
            try:
                run.start_processes()
                load = asyncio.create_task(run.load())
                try:
                    await eventually(lambda: len(target.done_at) > 100, within=60, what="load")
                    warm = time.monotonic()
                    await asyncio.sleep(3)  # the baseline window
                    # Full throughput: what the load asks for (three calls a task), or what the
                    # processes did before the fault if that is less.
                    baseline = min(run.throughput(warm, warm + 3), 3.0 * RATE)
                    await SCENARIOS[scenario](run)
                    recoveries = await run.recoveries(baseline)
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
                lost = await harness.executor_lost_events(dsn)
            except BaseException:
                _print_logs(run)
                raise
            finally:
                for proc in run.procs:
                    proc.stop()
                await pool.close()
    check = harness.check_calls(target, run.ids, run.faults)
    logs = _outage_lines(run) if scenario == "outage" else {}
    figures = {
        "form": "long" if LONG else "bounded",
        "faults": len(run.faults),
        "fault_details": _details(run.faults),
        "tasks": len(run.ids),
        "baseline_calls_per_s": round(baseline, 1),
        "calls_per_s_during_faults": [
            round(run.throughput(f.started, f.ended), 1)
            for f in run.faults
            if f.ended - f.started >= 0.5  # a kill lasts milliseconds: no rate to speak of
        ][:20],
        "recovery_s_each": [round(r, 1) for r in recoveries],
        "recovery_s_worst": round(max(recoveries), 1),
        "recovery_s_median": round(statistics.median(recoveries), 1),
        "executor_lost_events": lost,
        "seconds": round(time.monotonic() - began, 1),
        **check.figures(),
    }
    if run.locked:
        figures["tasks_locked"] = len(run.locked)
    if logs:
        figures["outage_log"] = logs
    harness.write_figures(tmp_path, f"chaos-{scenario}", figures)
    assert check.unexplained == [], f"repeated calls no fault explains: {check.unexplained[:20]}"
    assert check.not_three == {}, f"tasks without one call per stage: {check.not_three}"
    assert max(recoveries) <= RECOVERY_BOUND
    if scenario != "sigkill":
        # Every executor outlived the fault: none may be taken for lost.
        assert lost == 0, f"{lost} runs taken from executors that were alive"
    if scenario == "outage":
        _check_outage_log(logs)


def _details(faults: list[harness.Fault]) -> list[str] | dict[str, int]:
    """Each fault in a few words; counted by kind when there are many."""
    details = [f"{f.kind} {f.detail}".strip() for f in faults]
    return details if len(details) <= 20 else dict(collections.Counter(details))


def _outage_lines(run: Run) -> dict[str, Any]:
    """What the processes logged about the outage: by process, the lines lost/reminder/back,
    the seconds each reminder names, by component, and the tracebacks."""
    found: dict[str, Any] = {}
    for log in sorted(run.tmp.glob("*.log")):
        text = log.read_text(errors="replace")
        reminders: dict[str, list[int]] = {}
        for match in REMINDER.finditer(text):
            reminders.setdefault(match.group(1), []).append(int(match.group(2)))
        found[log.stem] = {
            "lost": text.count("database unreachable:"),
            "reminders": reminders,
            "back": text.count("database back after"),
            "tracebacks": text.count("Traceback"),
            "lines": len(text.splitlines()),
        }
    return found


def _check_outage_log(logs: dict[str, Any]) -> None:
    """Once lost per component, reminders at growing intervals, back once, no traceback."""
    for name, seen in logs.items():
        assert seen["tracebacks"] == 0, (name, seen)
        assert seen["lost"] >= 1, (name, seen)
        assert seen["back"] == seen["lost"], (name, seen)
        # The first reminder comes 10 s into the outage: every component that lost the
        # database reminds at least once.
        assert seen["reminders"], (name, seen)
        for component, after in seen["reminders"].items():
            # Reminders name whole seconds since the loss: 10, then 20 more, 40 more...
            first = logs_.OUTAGE_FIRST_REMINDER
            assert after[0] >= first - 1, (component, after)
            for k, (a, b) in enumerate(itertools.pairwise(after), start=1):
                assert b - a >= min(first * 2**k, logs_.OUTAGE_MAX_REMINDER) - 1, (component, after)


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
