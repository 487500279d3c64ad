"""Executor and manager together against a real PostgreSQL, with in-process and HTTP stages."""

from __future__ import annotations

import asyncio
import contextlib
import re
from datetime import timedelta

import asyncpg
import pytest

from kaiju_tasks import Message, Task, TaskCommand, Timer
from kaiju_tasks.conditions import Condition
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager
from kaiju_tasks.methods import MethodError, Methods
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import eventually
from tests import rpc_fake


async def wait_for(store, task_id, *statuses, within=10.0):
    """Poll the task row until it reaches one of ``statuses``; return the row."""

    async def reached():
        row = await store.get_task(task_id)
        return row if row is not None and row["status"] in statuses else None

    return await eventually(
        reached, within=within, interval=0.01, what=f"task {task_id} in {statuses}"
    )


@pytest.fixture
def calls():
    return []


@pytest.fixture
def registry(calls):
    methods = Methods()
    state = {"flaky": 0}

    @methods.register("items.m_get")
    async def m_get(conditions):
        calls.append(("items.m_get", conditions))
        return {"data": [{"id": "001"}, {"id": "005"}, {"id": "101"}]}

    @methods.register("items.m_delete")
    def m_delete(id):
        calls.append(("items.m_delete", id))
        return {"deleted": len(id)}

    @methods.register("echo")
    def echo(**kw):
        calls.append(("echo", kw))
        return kw

    @methods.register("count")
    def count(n):
        return {"count": n}

    @methods.register("flaky")
    def flaky(fail_times):
        state["flaky"] += 1
        calls.append(("flaky", state["flaky"]))
        if state["flaky"] <= fail_times:
            raise MethodError("not yet", code=-32010, data={"attempt": state["flaky"]})
        return {"attempt": state["flaky"]}

    @methods.register("boom")
    def boom():
        raise ValueError("broken")

    @methods.register("hang")
    async def hang():
        calls.append(("hang", None))
        await asyncio.sleep(3600)

    return methods


@pytest.fixture
async def executor(store, registry, clock, dsn):
    ex = Executor(
        store,
        apps=["default", "orders"],
        methods=registry,
        clock=clock,
        dsn=dsn,
        poll_interval=timedelta(milliseconds=50),
        heartbeat_interval=timedelta(milliseconds=200),
    )
    async with ex:
        yield ex


@pytest.fixture
def manager(store, clock):
    return Manager(store, clock=clock)


async def test_stages_share_data_through_templates(task_service, store, executor, calls):
    task = await task_service.create(
        Task(
            id="my_task",
            commands=[
                TaskCommand(method="items.m_get", params={"conditions": {"marked": True}}),
                TaskCommand(method="[kws.command_name]", params={"id": "[0.data.id]"}),
            ],
            kws={"command_name": "items.m_delete"},
        )
    )
    row = await wait_for(store, task["id"], "FINISHED", "FAILED")
    assert row["status"] == "FINISHED"
    assert row["exit_code"] == 0
    assert row["result"][1] == {"deleted": 3}
    assert calls == [("items.m_get", {"marked": True}), ("items.m_delete", ["001", "005", "101"])]


async def test_condition_skips_a_stage_and_records_none(task_service, store, executor, calls):
    task = await task_service.create(
        Task(
            commands=[
                TaskCommand(method="count", params={"n": 0}),
                TaskCommand(
                    method="echo", params={"x": 1}, condition=Condition({"0.count": {"gt": 0}})
                ),
                TaskCommand(
                    method="echo", params={"y": 2}, condition=Condition({"0.count": {"eq": 0}})
                ),
            ]
        )
    )
    row = await wait_for(store, task["id"], "FINISHED", "FAILED")
    assert row["result"] == [{"count": 0}, None, {"y": 2}]
    assert [c for c in calls if c[0] == "echo"] == [("echo", {"y": 2})]


async def test_notification_is_written_when_notify_is_on(
    task_service, notifications, store, executor
):
    task = await task_service.create(
        Task(commands=[TaskCommand(method="count", params=[7])], notify=True)
    )
    row = await wait_for(store, task["id"], "FINISHED")
    page = await notifications.list(conditions={"task_id": task["id"]})
    assert [(n["status"], n["result"], n["job_id"]) for n in page["data"]] == [
        ("FINISHED", [{"count": 7}], row["job_id"])
    ]


async def test_timer_parks_the_task_and_manager_resumes_it(
    task_service, store, executor, manager, clock
):
    task = await task_service.create(
        Task(
            commands=[
                TaskCommand(method="count", params=[1]),
                Timer(100),
                TaskCommand(method="count", params=[2]),
            ]
        )
    )
    row = await wait_for(store, task["id"], "WAITING")
    assert row["stage"] == 1
    assert row["executor_id"] is None
    assert row["wait_deadline"] == clock.now() + timedelta(seconds=100)
    assert (await manager.tick(clock.now()))["release_timers"] == 0
    clock.advance(100)
    assert (await manager.tick(clock.now()))["release_timers"] == 1
    row = await wait_for(store, task["id"], "FINISHED")
    assert row["result"] == [{"count": 1}, None, {"count": 2}]


async def test_message_resumes_with_its_data_as_the_stage_result(task_service, store, executor):
    task = await task_service.create(
        Task(
            commands=[
                TaskCommand(method="echo", params={"callback_id": "[id]"}),
                Message(max_timeout=None),
                TaskCommand(method="echo", params={"url": "[1.url]"}),
            ]
        )
    )
    await wait_for(store, task["id"], "WAITING")
    await task_service.write_message(task["id"], {"url": "http://statistics.example/r/1"})
    row = await wait_for(store, task["id"], "FINISHED")
    assert row["result"][2] == {"url": "http://statistics.example/r/1"}


async def test_message_as_last_stage_finishes_the_task(task_service, store, executor):
    task = await task_service.create(
        Task(commands=[TaskCommand(method="count", params=[1]), Message()])
    )
    await wait_for(store, task["id"], "WAITING")
    await task_service.write_message(task["id"], "done")
    row = await wait_for(store, task["id"], "FINISHED")
    assert row["result"] == [{"count": 1}, "done"]


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


async def test_exception_in_method_fails_the_stage_with_its_message(task_service, store, executor):
    task = await task_service.create(Task(commands=[TaskCommand(method="boom")]))
    row = await wait_for(store, task["id"], "FAILED")
    assert row["error"]["message"] == "ValueError: broken"
    assert row["exit_code"] == 1


async def test_unknown_method_fails_without_retry(task_service, store, executor):
    task = await task_service.create(Task(commands=[TaskCommand(method="nope")], max_retries=3))
    row = await wait_for(store, task["id"], "FAILED")
    assert row["retries"] == 0
    assert "not found" in row["error"]["message"]


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


async def test_http_stage_sends_correlation_id_deadline_and_stable_request_id(
    task_service, store, registry, clock, dsn, rpc_target
):
    target = await rpc_target(lambda call: {"got": call.params}, path="/public/rpc")
    url = target.url
    async with Executor(
        store,
        apps=["remote"],
        app_urls={"remote": url},
        clock=clock,
        dsn=dsn,
        poll_interval=timedelta(milliseconds=50),
    ):
        task = await task_service.create(
            Task(
                app="remote",
                commands=[TaskCommand(method="orders.delete", params={"expired": True})],
            )
        )
        row = await wait_for(store, task["id"], "FINISHED", "FAILED")
    assert row["result"] == [{"got": {"expired": True}}]
    (call,) = target.calls
    assert call.headers["X-Correlation-Id"] == row["job_id"]
    assert call.headers["X-Deadline"] == row["exec_deadline"].isoformat()
    assert call.id == f"{row['id']}:{row['job_id']}:0:0"
    assert call.method == "orders.delete"


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


async def test_deadline_applies_while_waiting(store, manager, clock, make_task):
    await make_task(
        id="w",
        status="WAITING",
        commands=[Timer(100), {"method": "a"}],
        job_id="j",
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(seconds=50),
        wait_deadline=clock.now() + timedelta(seconds=100),
    )
    clock.advance(60)
    await manager.tick(clock.now())
    row = await store.get_task("w")
    assert (row["status"], row["exit_code"]) == ("FAILED", 130)


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


async def test_two_executors_run_each_task_exactly_once(
    task_service, store, registry, clock, dsn, calls
):
    created = await task_service.create(
        [Task(commands=[TaskCommand(method="echo", params={"i": i})]) for i in range(300)]
    )
    async with (
        Executor(store, methods=registry, clock=clock, dsn=dsn, concurrency=10),
        Executor(store, methods=registry, clock=clock, dsn=dsn, concurrency=10),
    ):
        for task in created:
            await wait_for(store, task["id"], "FINISHED")
    assert sorted(kw["i"] for name, kw in calls if name == "echo") == list(range(300))


async def test_stop_hands_unfinished_tasks_back_and_manager_requeues_them(
    task_service, store, registry, clock, dsn, manager
):
    ex = Executor(
        store, methods=registry, clock=clock, dsn=dsn, shutdown_grace=timedelta(milliseconds=100)
    )
    await ex.start()
    task = await task_service.create(Task(commands=[TaskCommand(method="hang")]))
    await wait_for(store, task["id"], "EXECUTED")
    await ex.stop()
    row = await store.get_task(task["id"])
    assert row["status"] == "SUSPENDED"
    await manager.tick(clock.now())
    assert (await store.get_task(task["id"]))["status"] == "QUEUED"


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


async def test_every_log_record_of_a_stage_carries_the_job_id(
    task_service, store, clock, dsn, caplog
):
    import logging

    from kaiju_tasks import logs

    app_logger = logging.getLogger("orders.app")
    methods = Methods()

    @methods.register("orders.delete")
    def delete():
        app_logger.warning("deleting expired orders")
        return 1

    caplog.handler.addFilter(logs.TaskContextFilter())
    async with Executor(store, methods=methods, clock=clock, dsn=dsn):
        task = await task_service.create(Task(commands=[TaskCommand(method="orders.delete")]))
        row = await wait_for(store, task["id"], "FINISHED")
    records = [r for r in caplog.records if r.name == "orders.app"]
    assert [(r.job_id, r.task_id, r.stage) for r in records] == [(row["job_id"], row["id"], 0)]
    about_task = [r for r in caplog.records if getattr(r, "task_id", None) == row["id"]]
    assert about_task
    assert all(r.job_id == row["job_id"] for r in about_task)


def test_json_log_format_includes_task_fields():
    import json
    import logging

    from kaiju_tasks import context, logs

    record = logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "x"})
    token = context.current_task.set(
        {"task_id": "t", "job_id": "j", "stage": 2, "executor_id": "e"}
    )
    try:
        logs.TaskContextFilter().filter(record)
    finally:
        context.current_task.reset(token)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "hello"
    assert (line["task_id"], line["job_id"], line["stage"], line["executor_id"]) == (
        "t",
        "j",
        2,
        "e",
    )


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


async def test_liveness_checks_never_take_away_tasks_claimed_meanwhile(
    task_service, store, clock, dsn, caplog
):
    # Regression: a heartbeat-time status check used to revoke tasks claimed while it ran.
    methods = Methods()

    @methods.register("noop")
    async def noop():
        await asyncio.sleep(0.002)

    async with Executor(
        store, methods=methods, clock=clock, dsn=dsn, heartbeat_interval=timedelta(milliseconds=20)
    ):
        await task_service.create(
            [Task(commands=[TaskCommand(method="noop")]) for _ in range(1500)], columns=["id"]
        )

        async def all_finished():
            page = await task_service.list(conditions={"status": "FINISHED"}, limit=1)
            return page["count"] == 1500

        # On a timeout, the assertion below shows which tasks did not finish.
        with contextlib.suppress(AssertionError):
            await eventually(all_finished, within=60)
    statuses = await task_service.list(conditions={"status": {"ne": "FINISHED"}}, limit=5)
    assert statuses["count"] == 0, statuses["data"]
    assert not [r for r in caplog.records if getattr(r, "event", "") == "orphans_handed_back"]


async def test_every_transition_writes_an_event_and_notifies(
    task_service, store, executor, dsn, pool
):
    import asyncpg

    heard = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener("kaiju_tasks_events", lambda *args: heard.append(args[3]))
    try:
        task = await task_service.create(
            Task(
                commands=[
                    TaskCommand(method="count", params=[1]),
                    TaskCommand(method="count", params=[2]),
                ]
            )
        )
        row = await wait_for(store, task["id"], "FINISHED")
        await eventually(lambda: len(heard) >= 4)
    finally:
        await listener.close()
    events = await pool.fetch(
        "SELECT id, type, job_id, status, stage, executor_id FROM events WHERE task_id = $1"
        " ORDER BY id",
        task["id"],
    )
    assert [(e["type"], e["status"], e["stage"]) for e in events] == [
        ("task-sent", "QUEUED", 0),
        ("task-received", "EXECUTED", 0),
        ("task-started", "EXECUTED", 0),
        ("task-stage-succeeded", "EXECUTED", 0),
        ("task-succeeded", "FINISHED", 1),
    ]
    assert {e["job_id"] for e in events} == {row["job_id"]}
    assert events[1]["executor_id"] == events[2]["executor_id"] == executor.id
    assert all(payload.isdigit() for payload in heard)
    assert int(heard[-1]) >= events[-1]["id"]
    online = await pool.fetchval(
        "SELECT count(*) FROM events WHERE type = 'worker-online' AND executor_id = $1", executor.id
    )
    assert online == 1


async def test_a_result_that_is_not_json_fails_only_its_task(task_service, store, clock, dsn):
    methods = Methods()

    @methods.register("bad")
    def bad():
        return {1, 2}

    @methods.register("good")
    def good():
        return "ok"

    async with Executor(store, methods=methods, clock=clock, dsn=dsn):
        tasks = await task_service.create(
            [Task(commands=[TaskCommand(method="bad")], max_retries=3)]
            + [Task(commands=[TaskCommand(method="good")]) for _ in range(5)]
        )
        bad_row = await wait_for(store, tasks[0]["id"], "FAILED", "FINISHED")
        goods = [await wait_for(store, t["id"], "FINISHED", "FAILED") for t in tasks[1:]]
    assert bad_row["status"] == "FAILED"
    assert bad_row["retries"] == 0
    assert "not JSON" in bad_row["error"]["message"]
    assert {g["status"] for g in goods} == {"FINISHED"}


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


async def test_tasks_created_inside_a_stage_form_a_tree_with_the_roots_priority(
    task_service, store, clock, dsn
):
    methods = Methods()

    @methods.register("fan_out")
    async def fan_out(n):
        children = await task_service.create(
            [Task(commands=[TaskCommand(method="leaf")], priority="LOW") for _ in range(n)]
        )
        return [c["id"] for c in children]

    @methods.register("leaf")
    async def leaf():
        grandchild = await task_service.create(Task(commands=[TaskCommand(method="noop")]))
        return grandchild["id"]

    @methods.register("noop")
    def noop():
        return None

    async with Executor(store, methods=methods, clock=clock, dsn=dsn):
        root = await task_service.create(
            Task(commands=[TaskCommand(method="fan_out", params={"n": 2})], priority="HIGH")
        )
        row = await wait_for(store, root["id"], "FINISHED")
        children = row["result"][0]
        leaves = [await wait_for(store, c, "FINISHED") for c in children]
        grandchildren = [await wait_for(store, leaf["result"][0], "FINISHED") for leaf in leaves]
    tree = await task_service.list(conditions={"root_id": root["id"]}, columns=["id"])
    assert {t["id"] for t in tree["data"]} == {
        root["id"],
        *children,
        *(g["id"] for g in grandchildren),
    }
    assert {leaf["parent_id"] for leaf in leaves} == {root["id"]}
    assert {g["parent_id"] for g in grandchildren} == set(children)
    assert {r["priority"] for r in [*leaves, *grandchildren]} == {10}


async def test_under_backlog_high_priority_tasks_start_before_older_low_ones(
    task_service, store, clock, dsn
):
    started = []
    methods = Methods()

    @methods.register("work")
    def work(name):
        started.append(name)

    low = [
        Task(commands=[TaskCommand(method="work", params={"name": f"low{i}"})], priority="LOW")
        for i in range(20)
    ]
    await task_service.create(low)
    clock.advance(1)
    high = [
        Task(commands=[TaskCommand(method="work", params={"name": f"high{i}"})], priority="HIGH")
        for i in range(5)
    ]
    created = await task_service.create(high)
    async with Executor(store, methods=methods, clock=clock, dsn=dsn, concurrency=1, prefetch=0):
        await wait_for(store, created[-1]["id"], "FINISHED")
        await eventually(lambda: len(started) == 25)
    assert sorted(started[:5]) == [f"high{i}" for i in range(5)]  # same queued_at: any order


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


async def test_metrics_report_tasks_lag_executors_and_stage_durations(
    task_service, store, registry, clock, dsn
):
    from kaiju_tasks.metrics import Metrics

    metrics = Metrics(store, dsn, clock)
    await metrics.start()
    try:
        await task_service.create(Task(app="idle", commands=[TaskCommand(method="x")]))
        async with Executor(store, methods=registry, clock=clock, dsn=dsn):
            done = await task_service.create(
                [
                    Task(
                        commands=[
                            TaskCommand(method="count", params=[i]),
                            TaskCommand(method="echo", params={"i": i}),
                        ]
                    )
                    for i in range(5)
                ]
            )
            for task in done:
                await wait_for(store, task["id"], "FINISHED")
            clock.advance(30)
            await eventually(lambda: metrics.stage_duration.labels("echo")._sum.get() > 0)
            text = (await metrics.render()).decode()
    finally:
        await metrics.stop()
    assert 'kaiju_tasks_tasks{app="default",status="FINISHED"} 5.0' in text
    assert 'kaiju_tasks_tasks{app="idle",status="QUEUED"} 1.0' in text
    assert 'kaiju_tasks_queue_lag_seconds{app="idle"} 30.0' in text
    assert "kaiju_tasks_executors_alive 1.0" in text
    assert 'kaiju_tasks_stage_duration_seconds_count{method="count"} 5.0' in text
    assert 'kaiju_tasks_stage_duration_seconds_count{method="echo"} 5.0' in text
    written = re.search(r"^kaiju_tasks_events_written_total (\S+)$", text, re.MULTILINE)
    assert written is not None
    assert float(written.group(1)) > 0  # the collector always emits the line; the value counts


async def test_stage_calls_carry_the_app_token(task_service, store, clock, dsn, rpc_target):
    target = await rpc_target(lambda call: 1)
    async with Executor(
        store,
        apps=["r"],
        app_urls={"r": target.url},
        app_token="kt_secret",
        clock=clock,
        dsn=dsn,
    ):
        task = await task_service.create(Task(app="r", commands=[TaskCommand(method="m")]))
        await wait_for(store, task["id"], "FINISHED")
    assert [c.headers.get("Authorization") for c in target.calls] == ["Bearer kt_secret"]


# -- regressions from the concurrency review ------------------------------------------------------


async def test_a_result_with_a_nul_character_fails_its_task_and_spares_the_batch(
    task_service, store, clock, dsn
):
    methods = Methods()
    methods.add("nul", lambda: "a\x00b")
    methods.add("fine", lambda: "ok")
    async with Executor(store, methods=methods, clock=clock, dsn=dsn):
        created = await task_service.create(
            [Task(commands=[TaskCommand(method="nul")], max_retries=2)]
            + [Task(commands=[TaskCommand(method="fine")]) for _ in range(5)]
        )
        bad = await wait_for(store, created[0]["id"], "FAILED", "FINISHED")
        good = [await wait_for(store, t["id"], "FINISHED", "FAILED") for t in created[1:]]
    assert (bad["status"], bad["retries"]) == ("FAILED", 0)
    assert "NUL" in bad["error"]["message"]
    assert {g["status"] for g in good} == {"FINISHED"}


async def test_an_error_message_with_a_nul_character_is_still_recorded(
    task_service, store, clock, dsn
):
    methods = Methods()

    @methods.register("boom")
    def boom():
        raise RuntimeError("bad\x00byte")

    async with Executor(store, methods=methods, clock=clock, dsn=dsn):
        task = await task_service.create(Task(commands=[TaskCommand(method="boom")]))
        row = await wait_for(store, task["id"], "FAILED")
    assert row["error"]["message"] == "RuntimeError: bad\\0byte"


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


async def test_disabled_tasks_resumed_by_a_timer_or_message_wait_in_idle(
    task_service, store, manager, clock, make_task
):
    await make_task(
        id="t",
        status="WAITING",
        enabled=False,
        job_id="j",
        commands=[Timer(10), {"method": "a"}],
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(minutes=5),
        wait_deadline=clock.now(),
    )
    await make_task(
        id="m",
        status="WAITING",
        enabled=False,
        job_id="j",
        commands=[Message(), {"method": "a"}],
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(minutes=5),
    )
    await manager.tick(clock.now())
    await task_service.write_message("m", {"ok": True})
    for task_id in ("t", "m"):
        row = await store.get_task(task_id)
        assert (row["status"], row["stage"], row["next_run"]) == ("IDLE", 1, clock.now())
    await task_service.update("t", {"enabled": True})
    await manager.tick(clock.now())
    row = await store.get_task("t")
    assert (row["status"], row["stage"], row["job_id"]) == ("QUEUED", 1, "j")


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


async def test_a_hand_back_wakes_the_manager_in_the_same_statement(
    store, clock, dsn, pool, make_task
):
    await make_task(
        id="h",
        status="QUEUED",
        job_id="j",
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(minutes=5),
    )
    (claimed,) = await store.claim(["default"], "ex", limit=1, now=clock.now())
    heard: list[str] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener("kaiju_tasks_manager", lambda *args: heard.append(args[3]))
    try:
        assert await store.suspend_executor_tasks("ex", ["not-a-claim"], now=clock.now()) == set()
        # Notifications arrive in commit order: once this marker is heard, a wake-up sent by
        # the hand-back above would have been heard before it.
        await pool.execute("SELECT pg_notify('kaiju_tasks_manager', 'test-marker')")
        await eventually(lambda: "test-marker" in heard, within=5, what="the marker")
        assert heard == ["test-marker"]  # nothing handed back: the manager is left alone
        handed = await store.suspend_executor_tasks("ex", [claimed["claim_id"]], now=clock.now())
        assert handed == {"h"}
        await eventually(lambda: len(heard) > 1, within=5, what="the manager's wake-up")
    finally:
        await listener.close()


async def test_a_write_of_an_earlier_claim_never_touches_a_newer_run(store, clock, make_task):
    await make_task(
        id="c",
        status="QUEUED",
        job_id="j",
        commands=[{"method": "a"}, {"method": "b"}],
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(minutes=5),
    )
    (first,) = await store.claim(["default"], "ex", limit=1, now=clock.now())
    await store.suspend_executor_tasks("ex", [first["claim_id"]], now=clock.now())
    await store.requeue_suspended(now=clock.now(), limit=10)
    (second,) = await store.claim(["default"], "ex", limit=1, now=clock.now())
    assert first["claim_id"] != second["claim_id"]
    stale = {"id": "c", "stage": 0, "result": "stale", "claim_id": first["claim_id"]}
    assert await store.record_stages("ex", [stale], now=clock.now()) == set()
    assert await store.suspend_executor_tasks("ex", [first["claim_id"]], now=clock.now()) == set()
    fresh = {**stale, "result": "fresh", "claim_id": second["claim_id"]}
    assert await store.record_stages("ex", [fresh], now=clock.now()) == {"c"}
    assert (await store.get_task("c"))["result"] == ["fresh"]


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
        assert stopped == ["o"]
        assert ex.active == 1
        await pool.execute(
            "SELECT pg_notify('kaiju_tasks_cancel', $1)", f"{current['id']} {row['claim_id']}"
        )
        await eventually(lambda: ex.active == 0)
    assert stopped == ["o", "c"]


async def test_claims_take_tasks_of_one_priority_and_time_in_the_order_they_were_created(
    task_service, store, clock
):
    # One bulk create: one queued_at for all, so only the queue index's tie order decides: the
    # rows' place in the table, here fresh space, in the order given.
    ids = [f"t{i:03}" for i in range(300)][::-1]  # not in id order
    await task_service.create([Task(id=i, commands=[TaskCommand(method="m")]) for i in ids])
    await task_service.create(
        [Task(id=f"hi{i}", commands=[TaskCommand(method="m")], priority="HIGH") for i in range(3)]
    )
    taken = []
    while batch := await store.claim(["default"], "ex", limit=7, now=clock.now()):
        taken.append({row["id"] for row in batch})
    assert taken[0] == {"hi0", "hi1", "hi2", ids[0], ids[1], ids[2], ids[3]}
    rest = [ids[4:][i : i + 7] for i in range(0, len(ids) - 4, 7)]
    assert taken[1:] == [set(chunk) for chunk in rest]
