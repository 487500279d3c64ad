"""Failed stages: retries, rejects, timeouts and cancels."""

from __future__ import annotations

import asyncio
import functools
from datetime import timedelta

from kaiju_tasks import Task, TaskCommand
from kaiju_tasks.executor import Executor
from kaiju_tasks.methods import MethodError, Methods
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import eventually
from tests import rpc_fake
from tests.integration.engine.support import wait_for


async def test_retry_current_keeps_earlier_results_and_resumes_at_failed_stage(
    task_service, store, executor, calls
):
    task = await task_service.create(
        Task(
            commands=[
                TaskCommand(method="count", params=[1]),
                TaskCommand(method="flaky", params={"fail_times": 2}),
            ],
            max_retries=3,
            restart_policy="CURRENT",
        )
    )
    row = await wait_for(store, task["id"], "FINISHED", "FAILED")
    assert row["status"] == "FINISHED"
    assert row["retries"] == 2
    assert row["result"] == [{"count": 1}, {"attempt": 3}]


async def test_retry_first_starts_over_and_result_never_grows_past_stages(
    task_service, store, executor, calls
):
    task = await task_service.create(
        Task(
            commands=[
                TaskCommand(method="echo", params={"a": 1}),
                TaskCommand(method="flaky", params={"fail_times": 1}),
            ],
            max_retries=2,
            restart_policy="FIRST",
        )
    )
    row = await wait_for(store, task["id"], "FINISHED", "FAILED")
    assert row["status"] == "FINISHED"
    assert row["result"] == [{"a": 1}, {"attempt": 2}]
    assert [c for c in calls if c[0] == "echo"] == [("echo", {"a": 1})] * 2


async def test_final_failure_records_error_exit_code_and_notification(
    task_service, notifications, store, executor
):
    task = await task_service.create(
        Task(
            commands=[
                TaskCommand(method="count", params=[1]),
                TaskCommand(method="flaky", params={"fail_times": 5}),
            ],
            max_retries=1,
            notify=True,
        )
    )
    row = await wait_for(store, task["id"], "FAILED")
    assert row["exit_code"] == 1
    assert row["retries"] == 1
    assert row["error"]["code"] == -32010
    assert row["error"]["stage"] == 1
    assert row["error"]["data"] == {"attempt": 2}
    page = await notifications.list(conditions={"task_id": task["id"]})
    assert [n["status"] for n in page["data"]] == ["FAILED"]


async def test_stage_timeout_cancels_the_call_and_fails_with_130(
    task_service, store, executor, calls
):
    task = await task_service.create(Task(commands=[TaskCommand(method="hang", max_timeout=0.3)]))
    row = await wait_for(store, task["id"], "FAILED")
    assert row["exit_code"] == 130
    assert "stage max_timeout (0.3 s) exceeded" in row["error"]["message"]
    await eventually(lambda: executor.active == 0)


async def test_cancel_abandons_a_running_stage(task_service, store, executor, calls):
    task = await task_service.create(Task(commands=[TaskCommand(method="hang")]))
    await wait_for(store, task["id"], "EXECUTED")
    await eventually(lambda: ("hang", None) in calls)
    await task_service.cancel(task["id"])
    await eventually(lambda: executor.active == 0)
    row = await store.get_task(task["id"])
    assert (row["status"], row["exit_code"]) == ("FAILED", 130)


async def test_cancel_writes_a_notification_when_notify_is_on(task_service, notifications):
    task = await task_service.create(
        Task(commands=[TaskCommand(method="x")], notify=True, enabled=False)
    )
    await task_service.cancel(task["id"])
    page = await notifications.list(conditions={"task_id": task["id"]})
    assert [(n["status"], n["exit_code"]) for n in page["data"]] == [("FAILED", 130)]


async def test_a_remote_error_marked_not_retryable_is_not_retried(
    task_service, store, clock, dsn, rpc_target
):
    def refuse(call):
        raise rpc_fake.Fault(-32000, "bad input", {"retryable": False})

    target = await rpc_target(refuse)
    async with Executor(store, apps=["r"], app_urls={"r": target.url}, clock=clock, dsn=dsn):
        task = await task_service.create(
            Task(app="r", commands=[TaskCommand(method="m")], max_retries=3)
        )
        row = await wait_for(store, task["id"], "FAILED", "FINISHED")
    assert (row["status"], row["retries"]) == ("FAILED", 0)
    assert len(target.calls) == 1


async def _events_of(pool, task_id):
    rows = await pool.fetch("SELECT type FROM events WHERE task_id = $1 ORDER BY id", task_id)
    return [r["type"] for r in rows]


async def test_reject_fails_the_task_at_once_without_using_retries(
    task_service, store, clock, dsn, pool
):
    from kaiju_tasks import Reject

    methods = Methods()

    @methods.register("picky")
    def picky():
        raise Reject("not for me")

    async with Executor(store, methods=methods, clock=clock, dsn=dsn):
        task = await task_service.create(
            Task(commands=[TaskCommand(method="picky")], max_retries=3)
        )
        row = await wait_for(store, task["id"], "FAILED")
    assert (row["retries"], row["exit_code"]) == (0, 1)
    assert (row["error"]["code"], row["error"]["message"]) == (-32005, "not for me")
    assert (await _events_of(pool, task["id"]))[-1] == "task-rejected"


async def test_reject_with_requeue_returns_the_task_to_the_queue_without_a_retry(
    task_service, store, clock, dsn, pool
):
    from kaiju_tasks import Reject

    seen = []
    methods = Methods()

    @methods.register("later")
    def later():
        seen.append(1)
        if len(seen) < 3:
            raise Reject("busy", requeue=True)
        return "done"

    @methods.register("never")
    def never():
        raise Reject("never", requeue=True)

    async with Executor(store, methods=methods, clock=clock, dsn=dsn):
        task = await task_service.create(Task(commands=[TaskCommand(method="later")]))
        bounded = await task_service.create(Task(commands=[TaskCommand(method="never")]))
        row = await wait_for(store, task["id"], "FINISHED")
        stuck = await wait_for(store, bounded["id"], "FAILED")
    assert (row["result"], row["retries"], row["requeues"]) == (["done"], 0, 2)
    assert stuck["requeues"] == 10
    events = await _events_of(pool, bounded["id"])
    assert events.count("task-rejected") == 11
    assert events[-1] == "task-rejected"


async def test_a_remote_reject_with_requeue_is_honoured(
    task_service, store, clock, dsn, rpc_target
):
    async def later_once(call):
        if len(target.calls) == 1:
            raise rpc_fake.Fault(-32005, "later", {"requeue": True})
        return "ok"

    target = await rpc_target(later_once)
    async with Executor(store, apps=["r"], app_urls={"r": target.url}, clock=clock, dsn=dsn):
        task = await task_service.create(Task(app="r", commands=[TaskCommand(method="m")]))
        row = await wait_for(store, task["id"], "FINISHED", "FAILED")
    assert (row["status"], row["requeues"], row["retries"]) == ("FINISHED", 1, 0)


# -- regressions from the concurrency review ------------------------------------------------------


async def test_a_retry_claimed_while_the_failed_run_returns_runs_once_at_a_time(
    task_service, store, clock, dsn, pool, caplog
):
    class SlowFail(postgres.PostgresEngineStore):
        async def fail_tasks(self, items, *, now):
            applied = await super().fail_tasks(items, now=now)
            await asyncio.sleep(0.05)  # the committed retry is claimed before this returns
            return applied

    slow_store = SlowFail(pool)
    running: dict[str, int] = {}
    overlaps = []
    methods = Methods()

    @methods.register("flaky")
    async def flaky(key):
        running[key] = running.get(key, 0) + 1
        overlaps.append(running[key])
        await asyncio.sleep(0.01)
        running[key] -= 1
        raise MethodError("again")

    async with Executor(
        slow_store,
        methods=methods,
        clock=clock,
        dsn=dsn,
        heartbeat_interval=timedelta(milliseconds=30),
        lease=timedelta(seconds=30),  # no lapse under load: a lapse abandons calls
    ):
        created = await task_service.create(
            [
                Task(commands=[TaskCommand(method="flaky", params={"key": str(i)})], max_retries=5)
                for i in range(4)
            ]
        )
        for task in created:
            await wait_for(store, task["id"], "FAILED")
    assert max(overlaps) == 1
    assert not [r for r in caplog.records if getattr(r, "event", "") == "orphans_handed_back"]


async def test_a_cancel_notice_for_an_earlier_run_does_not_stop_the_current_one(
    task_service, store, clock, dsn, pool
):
    started: list[str] = []
    stopped: list[str] = []
    methods = Methods()

    @methods.register("hang")
    async def hang(key):
        started.append(key)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopped.append(key)
            raise

    async with Executor(store, methods=methods, clock=clock, dsn=dsn, concurrency=2) as ex:
        current, other = await task_service.create(
            [Task(commands=[TaskCommand(method="hang", params={"key": k})]) for k in "co"]
        )
        row = await wait_for(store, current["id"], "EXECUTED")
        other_row = await wait_for(store, other["id"], "EXECUTED")
        await eventually(lambda: sorted(started) == ["c", "o"], what="both stages to run")
        await pool.execute("SELECT pg_notify('kaiju_tasks_cancel', $1)", f"{current['id']} stale")
        # Notices arrive in commit order and stop their stage in that order: once the other
        # task's notice has stopped it, the stale notice has been handled.
        await pool.execute(
            "SELECT pg_notify('kaiju_tasks_cancel', $1)", f"{other['id']} {other_row['claim_id']}"
        )
        await eventually(lambda: "o" in stopped, what="the other task's cancel")
        # Its run ends once the cancel has unwound it (the done callback runs a moment later).
        await eventually(lambda: ex.active == 1, what="the other task's run to end")
        assert stopped == ["o"]
        await pool.execute(
            "SELECT pg_notify('kaiju_tasks_cancel', $1)", f"{current['id']} {row['claim_id']}"
        )
        await eventually(lambda: ex.active == 0)
    assert stopped == ["o", "c"]


async def test_a_retry_after_a_delay_waits_one_then_two_times_the_delay(
    task_service, store, executor, manager, clock
):
    # retry_delay 10 s: the first retry is due 10 s after the failure, the second 20 s after.
    task = await task_service.create(
        Task(
            commands=[TaskCommand(method="flaky", params={"fail_times": 2})],
            max_retries=3,
            retry_delay=10,
        )
    )
    for retries, wait in ((1, 10), (2, 20)):
        row = await eventually(
            functools.partial(_idle_after, store, task["id"], retries), what=f"retry {retries}"
        )
        assert row["next_run"] == clock.now() + timedelta(seconds=wait)
        clock.advance(wait)
        await manager.tick(clock.now())  # due: queued again, and the executor runs it
    row = await wait_for(store, task["id"], "FINISHED")
    assert row["retries"] == 2


async def test_a_run_past_its_deadline_is_retried_after_the_delay(
    task_service, store, manager, clock, make_task
):
    await make_task(
        id="late",
        status="QUEUED",
        exec_deadline=clock.now() - timedelta(seconds=1),
        max_retries=3,
        retries=2,
        retry_delay=5,
    )
    await manager.tick(clock.now())
    row = await store.get_task("late")
    assert row["status"] == "IDLE"
    assert row["retries"] == 3
    assert row["next_run"] == clock.now() + timedelta(seconds=5 * 2**2)


async def _idle_after(store, task_id, retries):
    row = await store.get_task(task_id)
    return row if row["status"] == "IDLE" and row["retries"] == retries else None
