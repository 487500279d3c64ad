"""Load and bookkeeping shared by the fault tests: a JSON-RPC target that records its calls.

Besides the load, this holds the checks every fault test makes on the stage calls
(:func:`check_calls`): a request id called again is explained only by a fault that hit that
very call (it had been made before the fault, and its result was not committed when the fault
struck), and a task no fault hit made exactly three calls. And the figures each test writes
(:func:`write_figures`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from kaiju_tasks import Task, TaskCommand
from kaiju_tasks.clock import SystemClock
from kaiju_tasks.rpc import protocol
from kaiju_tasks.store import migrate
from tests import rpc_fake

APP = "chaos"


_CLOCK = SystemClock()
ANSWERED: dict[int, float] = {}
"""When each call was answered (``time.monotonic()``), by ``id()`` of its :class:`rpc_fake.Call`."""


def _echo(call: rpc_fake.Call) -> Any:
    ANSWERED[id(call)] = time.monotonic()
    return call.params or {}


@contextlib.asynccontextmanager
async def counting_target(
    delay: float = 0.0, host: str = "127.0.0.1"
) -> AsyncIterator[rpc_fake.RpcTarget]:
    """A started JSON-RPC target on ``host`` that records each call and echoes its params.

    Each call waits ``delay`` seconds; ``done_at`` holds when each was answered, and
    :func:`answered_at` when a given call was.
    """
    ANSWERED.clear()
    async with rpc_fake.running(_echo, delay=delay, host=host) as target:
        yield target


def wall() -> float:
    """Now on the wall clock, in epoch seconds (the clock the executors read)."""
    return _CLOCK.now().timestamp()


def wall_of(monotonic: float) -> float:
    """A ``time.monotonic()`` reading on the wall clock (epoch seconds)."""
    return wall() - (time.monotonic() - monotonic)


def answered_at(call: rpc_fake.Call) -> float | None:
    """When the target answered ``call`` (``time.monotonic()``), None if it never did."""
    return ANSWERED.get(id(call))


def made_at(call: rpc_fake.Call) -> float | None:
    """When the executor made ``call``: its clock reading (epoch seconds) as it started it.

    The executor sends ``X-Deadline`` (absolute) and ``X-Timeout`` (seconds left), both from
    one reading of its clock taken just before the call: their difference is that reading. It
    says when the call was made, whatever the network did to it afterwards (a request held in a
    cut link's retransmissions arrives later than it was made). None without the headers.
    """
    deadline = call.headers.get(protocol.DEADLINE_HEADER)
    left = call.headers.get(protocol.TIMEOUT_HEADER)
    if deadline is None or left is None:
        return None
    return datetime.fromisoformat(deadline).timestamp() - float(left)


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


@dataclasses.dataclass
class Fault:
    """One fault injected: when it began and ended, and the runs it hit.

    ``at`` is the fault's instant on the wall clock (epoch seconds, the executors' clock: a
    call made before it was made before the fault). ``hit`` holds the (task id, stage) runs
    whose stage call the fault may have cut: for a SIGKILL, what the dead executor held in
    the database right after it died (a run's row names its stage until its result is
    committed); for a crash of the primary, what was EXECUTED on the standby at the crash. A
    fault that kills no caller (a restart, an outage) hits none.
    """

    kind: str
    started: float  # time.monotonic()
    ended: float  # time.monotonic(): the fault is over (restarted, terminated, killed)
    at: float  # the fault's instant on the wall clock (epoch seconds, see wall())
    hit: frozenset[tuple[str, int]] = frozenset()
    detail: str = ""


def _stage(rid: str) -> tuple[str, int]:
    task, _job, stage, _retries = rid.rsplit(":", 3)
    return task, int(stage)


def _when(call: rpc_fake.Call) -> float:
    """When ``call`` was made (epoch seconds); its arrival when the headers lack it."""
    made = made_at(call)
    if made is not None:
        return made
    return wall_of(call.at)


@dataclasses.dataclass
class CallCheck:
    """What :func:`check_calls` found."""

    calls: int = 0
    repeated: int = 0  # calls of a request id after its first
    explained: int = 0  # of those, explained by a fault that hit that very call
    unanswered_at_fault: int = 0  # explained: the call had not been answered at the fault
    answered_uncommitted: int = 0  # explained: answered, its result not yet committed
    unexplained: list[str] = dataclasses.field(default_factory=list)
    not_three: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def figures(self) -> dict[str, Any]:
        return {
            "stage_calls": self.calls,
            "calls_repeated": self.repeated,
            "repeats_explained_by_a_fault_in_that_call": self.explained,
            "explained_unanswered_at_the_fault": self.unanswered_at_fault,
            "explained_answered_not_committed": self.answered_uncommitted,
            "repeats_unexplained": len(self.unexplained),
            "tasks_without_exactly_three_stages": len(self.not_three),
        }


def check_calls(
    target: rpc_fake.RpcTarget, task_ids: Iterable[str], faults: Sequence[Fault]
) -> CallCheck:
    """Check every stage call of ``task_ids`` against the faults injected.

    - Each task called exactly three request ids, one per stage, each with ``retries`` 0: a
      task no fault hit made exactly three calls.
    - A request id called again is explained only by a fault between that call and the one
      before it (the earlier made before the fault's instant, the later after it) that hit
      that very run at that very stage (``Fault.hit``). The repeat carries the same request
      id by construction: a repeat under another id is a fourth request id of the task.
    """
    wanted = set(task_ids)
    by_rid: dict[str, list[rpc_fake.Call]] = defaultdict(list)
    for call in target.calls:
        if call.task_id in wanted:
            by_rid[str(call.id)].append(call)
    found = CallCheck()
    per_task: dict[str, list[str]] = defaultdict(list)
    for rid, calls in by_rid.items():
        per_task[calls[0].task_id].append(rid)
        found.calls += len(calls)
        run = _stage(rid)
        calls.sort(key=_when)
        for before, again in itertools.pairwise(calls):
            found.repeated += 1
            made, remade = _when(before), _when(again)
            fault = next((f for f in faults if run in f.hit and made < f.at <= remade), None)
            if fault is None:
                found.unexplained.append(rid)
                continue
            found.explained += 1
            answered = answered_at(before)
            if answered is None or wall_of(answered) > fault.at:
                found.unanswered_at_fault += 1
            else:
                found.answered_uncommitted += 1
    for task in wanted:
        rids = sorted(per_task.get(task, []))
        if sorted(_stage(r)[1] for r in rids) != [0, 1, 2] or any(
            not r.endswith(":0") for r in rids
        ):
            found.not_three[task] = rids
    return found


async def held(dsn: str, executor_id: str | None = None) -> frozenset[tuple[str, int]]:
    """(task id, stage) of every EXECUTED task (of ``executor_id`` if given), as committed."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT id, stage FROM tasks WHERE status = 'EXECUTED'"
            " AND ($1::text IS NULL OR executor_id = $1)",
            executor_id,
        )
    finally:
        await connection.close()
    return frozenset((r["id"], r["stage"]) for r in rows)


async def statuses(dsn: str, ids: list[str]) -> dict[str, str]:
    """The status of each of ``ids``."""
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT id, status FROM tasks WHERE id = ANY($1::text[])", ids
        )
    finally:
        await connection.close()
    return {r["id"]: r["status"] for r in rows}


async def executor_lost_events(dsn: str) -> int:
    """How many runs a manager took from an executor it held for lost."""
    connection = await asyncpg.connect(dsn)
    try:
        n: int = await connection.fetchval(
            "SELECT count(*) FROM events WHERE type = 'task-suspended'"
            " AND data->>'reason' = 'executor lost'"
        )
    finally:
        await connection.close()
    return n


REPORT_ENV = "KAIJU_TASKS_CHAOS_REPORT"


def write_figures(tmp: Path, name: str, figures: dict[str, Any]) -> None:
    """Print ``figures`` and write them as JSON: ``tmp/figures-<name>.json``, and under key
    ``name`` in the file ``KAIJU_TASKS_CHAOS_REPORT`` names (merged with what it holds)."""
    text = json.dumps(figures, indent=2, sort_keys=True, default=str)
    print(f"\n{name} figures: {text}")  # noqa: T201 - the figures of docs/reliability.md
    (tmp / f"figures-{name}.json").write_text(text + "\n")
    report = os.environ.get(REPORT_ENV)
    if report:
        path = Path(report)
        merged: dict[str, Any] = {}
        if path.exists():
            with contextlib.suppress(ValueError):
                merged = json.loads(path.read_text())
        merged[name] = figures
        path.write_text(json.dumps(merged, indent=2, sort_keys=True, default=str) + "\n")


def result_of(row: Any) -> Any:
    """The last stage's result of a finished three-stage task."""
    return row["result"][-1]
