"""Timer and message stages: a task parked while it waits, then resumed."""

from __future__ import annotations

from datetime import timedelta

from kaiju_tasks import Message, Task, TaskCommand, Timer
from tests.integration.engine.support import wait_for


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


# -- regressions from the concurrency review ------------------------------------------------------


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
