"""Stages run by the executor: templates, conditions, in-process and HTTP calls, results."""

from __future__ import annotations

from datetime import timedelta

from kaiju_tasks import Task, TaskCommand
from kaiju_tasks.conditions import Condition
from kaiju_tasks.executor import Executor
from kaiju_tasks.methods import Methods
from tests.integration.engine.support import wait_for


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
