"""Manager duties tick by tick: schedules, chains, rescues, deadlines, expiry, GC, leadership."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg

from kaiju_tasks import Task, TaskCommand
from kaiju_tasks.executor import Executor
from kaiju_tasks.methods import Methods
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import eventually
from tests.integration.engine.support import wait_for


async def test_chained_task_starts_when_the_first_finishes_not_when_it_fails(
    task_service, store, executor
):
    nxt = await task_service.create(
        Task(commands=[TaskCommand(method="count", params=[2])], enabled=True, cron=None)
    )
    await wait_for(store, nxt["id"], "FINISHED")
    first_job = (await store.get_task(nxt["id"]))["job_id"]
    ok = await task_service.create(
        Task(commands=[TaskCommand(method="count", params=[1])], next_task=nxt["id"])
    )
    await wait_for(store, ok["id"], "FINISHED")
    row = await wait_for(store, nxt["id"], "FINISHED", "QUEUED", "EXECUTED")
    assert row["job_id"] != first_job
    await wait_for(store, nxt["id"], "FINISHED")
    second_job = (await store.get_task(nxt["id"]))["job_id"]
    bad = await task_service.create(
        Task(commands=[TaskCommand(method="boom")], next_task=nxt["id"])
    )
    await wait_for(store, bad["id"], "FAILED")
    assert (await store.get_task(nxt["id"]))["job_id"] == second_job


async def test_cron_task_restarts_at_next_fire_time_with_fresh_job(
    task_service, store, executor, manager, clock
):
    task = await task_service.create(
        Task(commands=[TaskCommand(method="count", params=[1])], cron="*/5 * * * *")
    )
    assert task["status"] == "IDLE"
    clock.advance(timedelta(minutes=5))
    assert (await manager.tick(clock.now()))["schedule_due"] == 1
    row = await wait_for(store, task["id"], "FINISHED")
    assert row["next_run"] == clock.now() + timedelta(minutes=5)
    first_job = row["job_id"]
    clock.advance(timedelta(minutes=5))
    await manager.tick(clock.now())
    row = await wait_for(store, task["id"], "QUEUED", "EXECUTED", "FINISHED")
    assert row["job_id"] != first_job


async def test_manager_requeues_tasks_of_a_lost_executor_at_their_stage(
    store, manager, clock, make_task
):
    await make_task(
        id="lost",
        status="EXECUTED",
        executor_id="ghost",
        stage=1,
        commands=[{"method": "a"}, {"method": "b"}],
        result=[{"a": 1}],
        job_id="j1",
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(minutes=5),
    )
    done = await manager.tick(clock.now())
    assert done["rescue_stale"] == 1
    assert done["requeue_suspended"] == 1
    row = await store.get_task("lost")
    assert (row["status"], row["stage"], row["result"], row["job_id"]) == (
        "QUEUED",
        1,
        [{"a": 1}],
        "j1",
    )


async def test_manager_fails_tasks_past_their_deadline_with_130(store, manager, clock, make_task):
    await make_task(
        id="late",
        status="QUEUED",
        job_id="j",
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(seconds=10),
    )
    assert (await manager.tick(clock.now()))["expire_timeouts"] == 0
    clock.advance(11)
    assert (await manager.tick(clock.now()))["expire_timeouts"] == 1
    row = await store.get_task("late")
    assert (row["status"], row["exit_code"]) == ("FAILED", 130)
    assert "max_exec_timeout" in row["error"]["message"]


async def test_idle_due_task_is_queued_but_disabled_and_future_ones_are_not(
    store, manager, clock, make_task
):
    await make_task(id="due", status="IDLE", next_run=clock.now())
    await make_task(id="future", status="IDLE", next_run=clock.now() + timedelta(hours=1))
    await make_task(id="off", status="IDLE", next_run=clock.now(), enabled=False)
    assert (await manager.tick(clock.now()))["schedule_due"] == 1
    assert (await store.get_task("due"))["status"] == "QUEUED"
    assert (await store.get_task("future"))["status"] == "IDLE"
    assert (await store.get_task("off"))["status"] == "IDLE"


async def test_leadership_is_held_by_one_manager_at_a_time(store, clock, dsn):
    a = postgres.AdvisoryLeadership(dsn)
    b = postgres.AdvisoryLeadership(dsn)
    try:
        assert await a.hold()
        assert not await b.hold()
        await a.release()
        assert await b.hold()
    finally:
        await a.release()
        await b.release()


async def test_task_not_started_by_expires_at_is_revoked_without_retry(
    store, manager, clock, make_task
):
    await make_task(
        id="exp",
        status="QUEUED",
        job_id="j",
        queued_at=clock.now(),
        max_retries=3,
        exec_deadline=clock.now() + timedelta(minutes=5),
        expires_at=clock.now() + timedelta(seconds=5),
    )
    assert (
        await store.claim(["default"], "ex", limit=5, now=clock.now() + timedelta(seconds=6)) == []
    )
    clock.advance(6)
    await manager.tick(clock.now())
    row = await store.get_task("exp")
    assert (row["status"], row["exit_code"], row["retries"]) == ("FAILED", 130, 0)
    assert row["error"]["reason"] == "expired"


async def test_garbage_collection_keeps_old_tasks_that_others_chain_to(
    store, manager, clock, make_task
):
    old = clock.now() - timedelta(days=30)
    await make_task(id="target", status="FINISHED", status_change=old, next_run=None)
    await make_task(id="lonely", status="FINISHED", status_change=old, next_run=None)
    await make_task(
        id="chainer",
        status="IDLE",
        next_task="target",
        cron="0 0 * * *",
        next_run=clock.now() + timedelta(hours=1),
    )
    done = await manager.tick(clock.now())
    assert done["collect_garbage"] >= 1
    assert await store.get_task("lonely") is None
    assert await store.get_task("target") is not None
    assert (await store.get_task("chainer"))["next_task"] == "target"


async def test_a_retried_task_back_at_stage_zero_is_not_expired(store, manager, clock, make_task):
    await make_task(
        id="r",
        status="QUEUED",
        job_id="j",
        retries=1,
        max_retries=3,
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(minutes=5),
        expires_at=clock.now() - timedelta(seconds=1),
    )
    await manager.tick(clock.now())
    assert (await store.get_task("r"))["status"] == "QUEUED"


async def test_a_gc_only_manager_does_not_wait_behind_the_scheduling_leader(dsn):
    scheduling = postgres.AdvisoryLeadership(dsn, postgres.LEADER_LOCK_KEY)
    collecting = postgres.AdvisoryLeadership(dsn, postgres.GC_LOCK_KEY)
    try:
        assert await scheduling.hold()
        assert await collecting.hold()
    finally:
        await scheduling.release()
        await collecting.release()


async def test_a_started_task_requeued_after_expires_at_still_runs(
    task_service, store, clock, dsn, make_task
):
    await make_task(
        id="late",
        status="QUEUED",
        stage=1,
        job_id="j",
        queued_at=clock.now(),
        commands=[{"method": "x"}, {"method": "count", "params": [1]}],
        result=[None],
        exec_deadline=clock.now() + timedelta(minutes=5),
        expires_at=clock.now() - timedelta(seconds=1),
    )
    methods = Methods()
    methods.add("count", lambda n: {"count": n})
    async with Executor(store, methods=methods, clock=clock, dsn=dsn):
        row = await wait_for(store, "late", "FINISHED", "FAILED")
    assert (row["status"], row["result"]) == ("FINISHED", [None, {"count": 1}])


# -- regressions from the concurrency review ------------------------------------------------------


async def test_the_managers_timeout_does_not_fail_a_task_whose_deadline_moved(
    store, clock, make_task
):
    await make_task(
        id="moved",
        status="EXECUTED",
        executor_id="x",
        job_id="j",
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(minutes=5),
    )
    stale_item = {
        "id": "moved",
        "status": "EXECUTED",
        "executor_id": "x",
        "stage": 0,
        "error": {"message": "late"},
        "exit_code": 130,
        "retryable": True,
        "next_run": None,
        "due": "run",
    }
    assert await store.fail_tasks([stale_item], now=clock.now()) == []
    assert (await store.get_task("moved"))["status"] == "EXECUTED"


async def test_garbage_collection_spares_a_task_reset_during_the_scan(
    store, clock, make_task, dsn, pool
):
    old = clock.now() - timedelta(days=30)
    await make_task(id="old", status="FINISHED", status_change=old, next_run=None)
    other = await asyncpg.connect(dsn)
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute(
            "UPDATE tasks SET status = 'QUEUED', status_change = $1 WHERE id = 'old'", clock.now()
        )
        prune = asyncio.create_task(store.prune("tasks", before=clock.now(), limit=100))

        async def prune_waits_on_the_row_lock():
            return await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )

        # Commit the reset only once the DELETE has found the row and waits for its lock:
        # committing earlier would test a plain, unraced prune.
        await eventually(prune_waits_on_the_row_lock, what="the prune to wait on the row lock")
        await transaction.commit()
        assert await prune == 0
    finally:
        await other.close()
    assert (await store.get_task("old"))["status"] == "QUEUED"


async def test_updates_keep_ended_and_idle_tasks_schedulable(task_service, store, clock, make_task):
    await make_task(
        id="f",
        status="FINISHED",
        stage=2,
        commands=[{"method": "a"}, {"method": "b"}],
        result=[1, 2],
        next_run=None,
    )
    row = await task_service.update("f", {"cron": "0 * * * *"})
    assert row["next_run"] == (clock.now() + timedelta(hours=1)).isoformat()
    row = await task_service.update("f", {"commands": [{"method": "c"}]})
    assert (row["stage"], row["result"], row["stages"]) == (0, [], 1)
    await make_task(id="i", status="IDLE", enabled=False, cron=None, next_run=None)
    row = await task_service.update("i", {"enabled": True})
    assert row["next_run"] == clock.now().isoformat()
