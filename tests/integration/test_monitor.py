"""EventReceiver and State against a real PostgreSQL and a running executor."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from urllib.parse import urlsplit

import asyncpg
import pytest

from kaiju_tasks import Reject, Task, TaskCommand
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager
from kaiju_tasks.methods import MethodError, Methods
from kaiju_tasks.monitor import EventReceiver, State, format_event
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import eventually

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def registry():
    methods = Methods()
    attempts: dict[str, int] = {}

    @methods.register("ok")
    def ok(n=0):
        return {"n": n}

    @methods.register("flaky")
    def flaky(key, fails):
        attempts[key] = attempts.get(key, 0) + 1
        if attempts[key] <= fails:
            raise MethodError("not yet")
        return attempts[key]

    @methods.register("reject")
    def reject():
        raise Reject("not mine")

    return methods


async def _stop(task):
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _table_event_ids(pool):
    return [r["id"] for r in await pool.fetch("SELECT id FROM events ORDER BY id")]


async def test_receiver_catches_up_after_a_forced_disconnect_missing_and_repeating_nothing(
    task_service, store, registry, clock, dsn, server_dsn, pool
):
    seen: list[int] = []
    receiver = EventReceiver(
        dsn,
        {"*": lambda e: seen.append(e["id"])},
        after_id=0,
        poll_interval=timedelta(milliseconds=100),
    )
    capture = asyncio.create_task(receiver.capture())
    database = urlsplit(dsn).path.lstrip("/")
    async with Executor(store, methods=registry, clock=clock, dsn=dsn):
        for _ in range(3):
            await task_service.create(
                [
                    Task(
                        commands=[
                            TaskCommand(method="ok", params={"n": i}),
                            TaskCommand(method="ok"),
                        ]
                    )
                    for i in range(100)
                ]
            )
            admin = await asyncpg.connect(server_dsn)
            try:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = $1 AND application_name IN"
                    " ('kaiju-tasks-receiver', 'kaiju-tasks-listener')",
                    database,
                )
            finally:
                await admin.close()

        async def all_finished():
            page = await task_service.list(conditions={"status": "FINISHED"}, limit=1)
            return page["count"] == 300

        await eventually(all_finished)
    expected = await _table_event_ids(pool)
    await eventually(lambda: len(seen) >= len(expected))
    await _stop(capture)
    assert len(seen) == len(set(seen)), "an event was delivered twice"
    assert sorted(seen) == expected, "an event was missed"


async def test_an_event_of_a_transaction_still_running_is_not_skipped(
    store, dsn, pool, monkeypatch
):
    reads = 0
    events_after = postgres.PostgresTaskStore.events_after

    async def counted(self, *args, **kwargs):
        nonlocal reads
        try:
            return await events_after(self, *args, **kwargs)
        finally:
            reads += 1

    monkeypatch.setattr(postgres.PostgresTaskStore, "events_after", counted)
    seen: list[int] = []
    receiver = EventReceiver(
        dsn,
        {"*": lambda e: seen.append(e["id"])},
        after_id=0,
        poll_interval=timedelta(milliseconds=50),
    )
    capture = asyncio.create_task(receiver.capture())
    slow = await asyncpg.connect(dsn)
    try:
        transaction = slow.transaction()
        await transaction.start()
        first = await slow.fetchval(
            "INSERT INTO events (type, created) VALUES ('test-slow', now()) RETURNING id"
        )
        second = await pool.fetchval(
            "INSERT INTO events (type, created) VALUES ('test-fast', now()) RETURNING id"
        )
        assert first < second
        # Two more reads end: the second of them began after ``second`` was committed.
        done = reads
        await eventually(lambda: reads >= done + 2, what="the receiver to read again")
        assert second not in seen  # its id is past one whose transaction has not ended
        await transaction.commit()
    finally:
        await slow.close()
    await eventually(lambda: second in seen)
    await _stop(capture)
    assert first in seen


async def test_state_matches_the_database_after_a_run_with_failures_and_retries(
    task_service, store, registry, clock, dsn, pool
):
    """1,000 tasks: successes, retries that then succeed, failures after retries, rejects.

    One State follows live (an EventReceiver during the run), another is rebuilt from the
    events table afterwards; both must agree with the tasks table.
    """
    tasks = [Task(commands=[TaskCommand(method="ok", params={"n": i})]) for i in range(700)]
    tasks += [
        Task(
            commands=[TaskCommand(method="flaky", params={"key": f"r{i}", "fails": 1})],
            max_retries=2,
        )
        for i in range(150)
    ]
    tasks += [
        Task(
            commands=[TaskCommand(method="flaky", params={"key": f"f{i}", "fails": 9})],
            max_retries=1,
        )
        for i in range(100)
    ]
    tasks += [Task(commands=[TaskCommand(method="reject")]) for _ in range(50)]
    live = State()
    receiver = EventReceiver(
        dsn, {"*": live.event}, after_id=0, poll_interval=timedelta(milliseconds=100)
    )
    capture = asyncio.create_task(receiver.capture())
    async with Executor(store, methods=registry, clock=clock, dsn=dsn):
        created = await task_service.create(tasks, columns=["id"])
        assert len(created) == 1000

        async def ended():
            page = await task_service.list(conditions={"status": ["FINISHED", "FAILED"]}, limit=1)
            return page["count"] == len(created)

        await eventually(ended)
    total = await pool.fetchval("SELECT count(*) FROM events")
    await eventually(lambda: live.event_count >= total)
    await _stop(capture)
    rebuilt = State()
    applied = await rebuilt.rebuild(dsn)
    assert applied == total
    assert live.event_count == total
    rows = await pool.fetch("SELECT id, status, job_id, stage, retries, exit_code FROM tasks")
    for state in (live, rebuilt):
        assert len(state.tasks) == len(rows) == 1000
        for row in rows:
            task = state.tasks[row["id"]]
            assert (task.status, task.job_id) == (row["status"], row["job_id"])
            # Events name the stage they happened at; a finished row's stage is one past the last.
            assert task.stage == (row["stage"] - 1 if row["status"] == "FINISHED" else row["stage"])
            if row["status"] == "FINISHED":
                assert task.times["succeeded"] >= task.times["started"] >= task.times["sent"]
                assert task.times["started"] >= task.times["received"] >= task.times["sent"]
                assert task.runtime is not None
            else:
                assert task.error is not None
            if row["retries"]:
                assert "retried" in task.times
        assert sum(1 for t in state.tasks.values() if t.status == "FINISHED") == 850
        assert sum(1 for t in state.tasks.values() if t.status == "FAILED") == 150
        assert sum(1 for t in state.tasks.values() if "rejected" in t.times) == 50
        assert sum(1 for t in state.tasks.values() if "retried" in t.times) == 250
        assert all(w.online is False for w in state.workers.values())  # the executor stopped


def test_state_memory_is_bounded():
    from datetime import UTC, datetime

    state = State(max_tasks=10)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    for i in range(100):
        state.event(
            {"id": i, "type": "task-sent", "task_id": f"t{i}", "status": "QUEUED", "created": now}
        )
    assert list(state.tasks) == [f"t{i}" for i in range(90, 100)]


async def test_monitor_lines_for_the_celery_article_scenarios(
    task_service, store, registry, clock, dsn, make_task
):
    lines: list[str] = []
    receiver = EventReceiver(
        dsn,
        {"*": lambda e: lines.append(format_event(e))},
        after_id=0,
        poll_interval=timedelta(milliseconds=50),
    )
    async with Executor(store, apps=["orders"], methods=registry, clock=clock, dsn=dsn):
        happy = await task_service.create(
            Task(app="orders", commands=[TaskCommand(method="ok"), TaskCommand(method="ok")])
        )
        retried = await task_service.create(
            Task(
                app="orders",
                max_retries=1,
                commands=[TaskCommand(method="flaky", params={"key": "x", "fails": 5})],
            )
        )
        rejected = await task_service.create(
            Task(app="orders", commands=[TaskCommand(method="reject")])
        )
        await eventually(lambda: _ended(store, [happy["id"], retried["id"], rejected["id"]]))
    await make_task(
        id="expired",
        app_name="orders",
        status="QUEUED",
        job_id="j",
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(minutes=5),
        expires_at=clock.now() - timedelta(seconds=1),
    )
    await Manager(store, clock=clock).tick(clock.now())
    await receiver.capture(timeout=1.5)

    def about(task_id):
        return [line.split("] ", 1)[1] for line in lines if f"ID={task_id}," in line]

    # stages counted from 0, as in templates ([0.data]), results and errors
    assert about(happy["id"]) == [
        f"TASK-SENT orders (STATUS=QUEUED, ID={happy['id']}, STAGE=0/2)",
        f"TASK-RECEIVED orders (STATUS=EXECUTED, ID={happy['id']}, STAGE=0/2)",
        f"TASK-STARTED orders (STATUS=EXECUTED, ID={happy['id']}, STAGE=0/2)",
        f"TASK-STAGE-SUCCEEDED orders (STATUS=EXECUTED, ID={happy['id']}, STAGE=0/2)",
        f"TASK-SUCCEEDED orders (STATUS=FINISHED, ID={happy['id']}, STAGE=1/2)",
    ]
    assert [line.split(" ")[0] for line in about(retried["id"])] == [
        "TASK-SENT",
        "TASK-RECEIVED",
        "TASK-STARTED",
        "TASK-RETRIED",
        "TASK-RECEIVED",
        "TASK-STARTED",
        "TASK-FAILED",
    ]
    assert [line.split(" ")[0] for line in about(rejected["id"])][-1] == "TASK-REJECTED"
    assert about("expired") == ["TASK-REVOKED orders (STATUS=FAILED, ID=expired, STAGE=0/1)"]
    assert any(line.split("] ", 1)[1].startswith("WORKER-ONLINE") for line in lines)


async def _ended(store, ids):
    for task_id in ids:
        if (await store.get_task(task_id))["status"] not in ("FINISHED", "FAILED"):
            return False
    return True
