"""Debug executors (Karton's debug mode): private queues, never production work."""

from __future__ import annotations

import asyncio
import signal
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from kaiju_tasks import Task, TaskCommand, TaskRuntime, errors, methods
from kaiju_tasks.clock import SystemClock
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager, steps
from kaiju_tasks.metrics import Metrics
from kaiju_tasks.models import Caller
from kaiju_tasks.service import TaskService
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import eventually
from tests.acceptance.test_cli import Running

FAST = {"poll_interval": timedelta(seconds=0.05), "shutdown_grace": timedelta(seconds=0.2)}


def _worker(name: str, seen: list[tuple[str, int]]) -> methods.Methods:
    registry = methods.Methods()

    @registry.register("orders.work")
    async def work(n: int) -> dict[str, Any]:
        seen.append((name, n))
        return {"by": name}

    @registry.register("orders.hang")
    async def hang() -> None:
        await asyncio.Event().wait()

    return registry


async def _made(tasks: TaskService, data: Any) -> Any:
    return await tasks.create(data)


def _work(app: str, n: int) -> Task:
    return Task(
        app=app, kws={"n": n}, commands=[TaskCommand(method="orders.work", params={"n": n})]
    )


async def _statuses(tasks: TaskService, ids: list[str]) -> dict[str, str]:
    page = await tasks.list(conditions={"id": ids}, columns=["id", "status"], limit=len(ids))
    return {row["id"]: row["status"] for row in page["data"]}


async def test_debug_and_production_executors_never_take_each_others_tasks(dsn: str) -> None:
    prod_seen: list[tuple[str, int]] = []
    debug_seen: list[tuple[str, int]] = []
    prod = TaskRuntime(
        dsn, apps=["orders"], methods=_worker("prod", prod_seen), executor_options=FAST
    )
    debug = TaskRuntime(
        dsn,
        apps=["orders"],
        methods=_worker("debug", debug_seen),
        debug=True,
        apply_migrations=False,
        executor_options=FAST,
    )
    async with prod, debug:
        assert debug.manager is None  # a debug runtime does not lead a production database
        queue = debug.debug_queues["orders"]
        assert queue.startswith("orders@debug-")
        assert len(queue) == len("orders@debug-") + 8
        assert prod.debug_queues == {}
        prod_ids = [
            row["id"] for row in await _made(prod.tasks, [_work("orders", n) for n in range(20)])
        ]
        debug_ids = [
            row["id"] for row in await _made(prod.tasks, [_work(queue, n) for n in range(100, 120)])
        ]
        everything = prod_ids + debug_ids

        async def all_finished() -> bool:
            return set((await _statuses(prod.tasks, everything)).values()) == {"FINISHED"}

        await eventually(all_finished, what="both sets of tasks to finish")
        assert sorted(n for _, n in prod_seen) == list(range(20))
        assert {name for name, _ in prod_seen} == {"prod"}
        assert sorted(n for _, n in debug_seen) == list(range(100, 120))
        assert {name for name, _ in debug_seen} == {"debug"}

        # A production task routed to the debug queue runs there, with what the original ran.
        copy = await prod.tasks.copy(prod_ids[3], queue)
        assert copy["id"] != prod_ids[3]
        assert copy["app_name"] == queue
        assert copy["meta"] == {"copy_of": prod_ids[3]}
        await eventually(
            lambda: ("debug", 3) in debug_seen, what="the copy to run on the debug executor"
        )
        assert prod_seen.count(("prod", 3)) == 1
        await eventually(lambda: _finished(prod.tasks, copy["id"]), what="the copy to be recorded")
        done = await prod.tasks.get(copy["id"], ["status", "result"])
        assert done == {"status": "FINISHED", "result": [{"by": "debug"}]}

        # top, /metrics and the executors' rows say which executor is the debug one.
        assert prod.store is not None
        now = SystemClock().now()
        top = await prod.store.top(heard_since=now - timedelta(minutes=1), limit=10)
        flags = {w["id"]: w["debug"] for w in top["workers"]}
        assert debug.executor is not None
        assert prod.executor is not None
        assert flags[debug.executor.id] is True
        assert flags[prod.executor.id] is False
        connection = await asyncpg.connect(dsn)
        try:
            online = await connection.fetch(
                "SELECT executor_id, data->'debug' AS debug FROM events"
                " WHERE type = 'worker-online'"
            )
        finally:
            await connection.close()
        # the worker-online events say which one is the debug executor (kaiju-tasks events)
        assert {r["executor_id"]: r["debug"] for r in online} == {
            debug.executor.id: "true",
            prod.executor.id: "false",
        }
        scrape = (await Metrics(prod.store, dsn).render()).decode()
        assert "kaiju_tasks_debug_executors_alive 1.0" in scrape
        assert "kaiju_tasks_executors_alive 2.0" in scrape


async def _finished(tasks: TaskService, task_id: str) -> bool:
    return (await tasks.get(task_id, ["status"]))["status"] == "FINISHED"


async def test_tasks_left_in_a_stopped_debug_executors_queue_fail_with_a_reason(dsn: str) -> None:
    debug = TaskRuntime(
        dsn,
        apps=["orders"],
        methods=_worker("debug", []),
        debug=True,
        executor_options={**FAST, "concurrency": 1, "prefetch": 0},
    )
    await debug.start()
    try:
        queue = debug.debug_queues["orders"]
        hanging = await _made(
            debug.tasks, Task(app=queue, commands=[TaskCommand(method="orders.hang")])
        )
        await eventually(
            lambda: _status_is(debug.tasks, hanging["id"], "EXECUTED"), what="the hang to start"
        )
        queued = await _made(debug.tasks, _work(queue, 1))  # the one slot is taken
        waiting = await _made(
            debug.tasks,
            Task(app=queue, commands=[{"method": "_MESSAGE_"}, TaskCommand(method="orders.work")]),
        )
        assert (await debug.tasks.get(queued["id"], ["status"]))["status"] == "QUEUED"
    finally:
        await debug.stop()
    async with TaskRuntime(dsn, apps=[], apply_migrations=False) as reader:
        for task in (hanging, queued, waiting):
            row = await reader.tasks.get(task["id"], ["status", "exit_code", "error"])
            assert row["status"] == "FAILED", (task, row)
            assert row["exit_code"] == 130
            assert row["error"]["reason"] == "debug_executor_gone"
            assert queue in row["error"]["message"]


async def _status_is(tasks: TaskService, task_id: str, status: str) -> bool:
    return (await tasks.get(task_id, ["status"]))["status"] == status


async def test_the_manager_fails_tasks_of_debug_executors_that_died_or_never_were(
    store: postgres.PostgresEngineStore, task_service: TaskService, clock: Any
) -> None:
    now = clock.now()
    settings = steps.Settings(stale_after=timedelta(seconds=30))
    await store.register_executor(
        "dead", apps=["shop@debug-0000dead"], host="h", pid=1, concurrency=1, now=now, debug=True
    )
    await store.register_executor(
        "live", apps=["shop@debug-0000a11e"], host="h", pid=2, concurrency=1, now=now, debug=True
    )
    dead = await _made(task_service, _work("shop@debug-0000dead", 1))
    live = await _made(task_service, _work("shop@debug-0000a11e", 2))
    never = await _made(task_service, _work("shop@debug-00000000", 3))
    production = await _made(task_service, _work("shop", 4))
    # Only a queue nobody ever served is gone at once: the dead one has not been silent enough.
    assert await steps.fail_debug_orphans(store, now, settings) == 1
    assert (await task_service.get(never["id"], ["status"]))["status"] == "FAILED"
    assert (await task_service.get(dead["id"], ["status"]))["status"] == "QUEUED"

    later = clock.advance(timedelta(seconds=31))
    await store.heartbeat("live", active=0, now=later)
    # A manager that has not watched the database for stale_after does not count silence.
    assert (
        await steps.fail_debug_orphans(
            store, later, settings, observed_since=later - timedelta(seconds=5)
        )
        == 0
    )
    assert await steps.fail_debug_orphans(store, later, settings) == 1
    row = await task_service.get(dead["id"], ["status", "error"])
    assert row["status"] == "FAILED"
    assert row["error"]["reason"] == "debug_executor_gone"
    for task in (live, production):
        assert (await task_service.get(task["id"], ["status"]))["status"] == "QUEUED"


async def test_the_managers_tick_fails_the_tasks_of_a_sigkilled_debug_executor(
    dsn: str, store: postgres.PostgresEngineStore, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # A real `kaiju-tasks executor --debug` dies without a word (SIGKILL): no stop() fails its
    # queue. Its row goes stale, and the manager's own tick fails what it held (EXECUTED) and
    # what waited in its queue (QUEUED), with the reason, instead of their 5-minute deadline.
    tasks = TaskService(store, SystemClock())  # the executor's clock: real time
    debug = Running(
        "--dsn",
        dsn,
        "executor",
        "--debug",
        "--methods",
        "tests.acceptance.methods_for_cli:methods",
        "--heartbeat",
        "0.2",
        "--concurrency",
        "1",
        "--prefetch",
        "0",
    )
    try:
        debug.wait_for("kaiju-tasks executor running")
        queue = debug.wait_for("debug queue for default:")
        never = str(tmp_path / "never-created")  # cli.hold runs until this file exists
        held = await _made(
            tasks,
            Task(app=queue, commands=[TaskCommand(method="cli.hold", params={"path": never})]),
        )
        running = await eventually(
            lambda: _row_if(tasks, held["id"], "EXECUTED"), what="the debug executor's call"
        )
        queued = await _made(tasks, _work(queue, 1))  # its one slot is taken
        executor_id = running["executor_id"]
        online = await pool.fetchval(
            "SELECT data FROM events WHERE type = 'worker-online' AND executor_id = $1",
            executor_id,
        )
        assert online["debug"] is True  # the worker-online event says so
        debug.process.kill()
        assert debug.process.wait(30) == -signal.SIGKILL
    finally:
        debug.close()
    row = await pool.fetchrow(
        "SELECT heartbeat_at, stopped_at, lease FROM executors WHERE id = $1", executor_id
    )
    assert row["stopped_at"] is None  # it never said goodbye
    silent = max(steps.DEFAULT_STALE_AFTER, row["lease"] or timedelta(0))
    manager = Manager(store, clock=SystemClock())
    ids = [held["id"], queued["id"]]
    # Ticks at chosen times, not after waits: first while its silence is still short...
    await manager.tick(row["heartbeat_at"] + silent - timedelta(seconds=1))
    assert await _statuses(tasks, ids) == {held["id"]: "EXECUTED", queued["id"]: "QUEUED"}
    # ... then once it has been silent for stale_after (and its lease has run out).
    done = await manager.tick(row["heartbeat_at"] + silent + timedelta(seconds=1))
    assert done["fail_debug_orphans"] == 2, done
    for task_id in ids:
        failed = await tasks.get(task_id, ["status", "exit_code", "error"])
        assert (failed["status"], failed["exit_code"]) == ("FAILED", 130), failed
        assert failed["error"]["reason"] == "debug_executor_gone"
        assert queue in failed["error"]["message"]


async def _row_if(tasks: TaskService, task_id: str, status: str) -> dict[str, Any] | None:
    row = await tasks.get(task_id)
    return row if row["status"] == status else None


async def test_production_executors_refuse_debug_queue_names(
    store: postgres.PostgresEngineStore,
) -> None:
    with pytest.raises(errors.ConfigError, match="@debug-"):
        Executor(store, apps=["orders", "orders@debug-12345678"])


async def test_copy_needs_to_see_the_original_and_makes_a_one_off(
    task_service: TaskService,
) -> None:
    original = await _made(
        task_service,
        Task(
            app="shop",
            commands=[TaskCommand(method="m")],
            cron="0 * * * *",
            max_retries=2,
            meta={"team": "a"},
            user_id="alice",
        ),
    )
    with pytest.raises(errors.TaskNotFound):
        await task_service.copy(original["id"], "shop@debug-1", caller=Caller.user("bob"))
    mine = await task_service.copy(original["id"], caller=Caller.user("alice"))
    assert mine["user_id"] == "alice"
    assert mine["app_name"] == "shop"
    assert mine["status"] == "QUEUED"
    assert mine["cron"] is None
    assert mine["max_retries"] == 2
    assert mine["meta"] == {"team": "a", "copy_of": original["id"]}
    with pytest.raises(errors.ValidationError) as refused:
        await task_service.copy(original["id"], "")
    assert refused.value.field == "app_name"
    routed = await task_service.copy(original["id"], app="shop@debug-0a1b2c3d")  # as in create
    assert routed["app_name"] == "shop@debug-0a1b2c3d"


async def test_debug_queues_are_never_reported_as_waiting_for_an_executor(
    store: postgres.PostgresEngineStore, task_service: TaskService, clock: Any
) -> None:
    await _made(task_service, _work("shop@debug-0a1b2c3d", 1))
    await _made(task_service, _work("shop", 2))
    now = clock.now()
    unserved = await store.unserved_apps(now=now, alive_since=now, limit=None)
    assert [row["app"] for row in unserved] == ["shop"]  # the manager fails the other one
