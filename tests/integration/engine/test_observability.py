"""What a run leaves to watch it by: log records, events and notifications, metrics."""

from __future__ import annotations

import re

import asyncpg

from kaiju_tasks import Task, TaskCommand
from kaiju_tasks.executor import Executor
from kaiju_tasks.methods import Methods
from kaiju_tasks.testing import eventually
from tests.integration.engine.support import wait_for


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


async def test_every_transition_writes_an_event_and_notifies(
    task_service, store, executor, dsn, pool
):

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
