"""The user guide's examples run end to end: a TaskRuntime (executor and manager) with the
application's stages served by a real JSON-RPC service over HTTP on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta
from typing import Any

import pytest

from kaiju_tasks import (
    Condition,
    Message,
    NotificationService,
    Task,
    TaskCommand,
    TaskRuntime,
    Timer,
    logs,
    testing,
)
from tests import pgbouncer, rpc_fake

pytestmark = pytest.mark.timeout(60)


class Orders:
    """The application: the guide's methods, served by a JSON-RPC target."""

    def __init__(self) -> None:
        self.fail_sync = 2
        self.count = 1000

    def answer(self, call: rpc_fake.Call) -> Any:
        logging.getLogger("orders.app").info("called %s", call.method)
        handler = getattr(self, call.method.replace(".", "_"), None)
        if handler is None:
            raise rpc_fake.Fault(-32601, f"method {call.method} not found")
        try:
            return handler(**(call.params or {}))
        except RuntimeError as exc:
            raise rpc_fake.Fault(-32000, str(exc)) from None

    def items_m_get(self, conditions):
        return {"data": [{"id": "001"}, {"id": "005"}, {"id": "101"}]}

    def items_m_delete(self, id):
        return {"deleted": id}

    def orders_delete(self, conditions):
        return {"deleted": 3}

    def cache_clear(self):
        return True

    def cache_update(self):
        return {"updated": True}

    def server_sync(self):
        if self.fail_sync > 0:
            self.fail_sync -= 1
            raise RuntimeError("server busy")
        return "synced"

    def settings_get(self):
        return {"cache": {"update_threshold": 42}}

    def products_update_attributes(self):
        return {"count": self.count}

    def products_cache_refresh(self):
        return "refreshed"

    def statistics_request_report(self, callback_id):
        return {"requested_for": callback_id}

    def files_download(self, url):
        return {"downloaded": url}

    def do_something(self):
        return 1

    def do_something_else(self):
        return 2


@pytest.fixture
def app():
    return Orders()


@pytest.fixture
async def orders(rpc_target, app):
    """The application's JSON-RPC service; it records every call."""
    return await rpc_target(app.answer, path="/public/rpc")


@pytest.fixture(params=["direct", "pgbouncer"])
async def runtime(request, dsn, orders):
    """The guide's runtime, on the database directly or through PgBouncer (transaction mode)."""
    with contextlib.ExitStack() as stack:
        if request.param == "pgbouncer":
            pooled, direct = stack.enter_context(pgbouncer.pgbouncer(dsn)), dsn
        else:
            pooled, direct = dsn, None
        async with _runtime(pooled, direct, orders) as rt:
            yield rt


@contextlib.asynccontextmanager
async def _runtime(dsn, direct_dsn, orders):
    async with TaskRuntime(
        dsn,
        direct_dsn=direct_dsn,
        apps=["orders", "default"],
        app_urls={"orders": orders.url, "default": orders.url},
        manager_options={"interval": timedelta(milliseconds=100)},
        executor_options={"poll_interval": timedelta(milliseconds=100)},
    ) as rt:
        yield rt


async def finished(runtime, task_id, within=20.0):
    deadline = time.monotonic() + within
    while True:
        task = await runtime.tasks.get(task_id)
        if task["status"] in ("FINISHED", "FAILED"):
            return task
        if time.monotonic() > deadline:
            raise AssertionError(f"task {task_id} is still {task['status']}")
        await asyncio.sleep(0.02)


self = type("Self", (), {"app": type("App", (), {"name": "orders"})})()


async def test_creating_tasks_runs_their_stages(runtime, orders):
    task = await runtime.tasks.create(
        Task(
            app=self.app.name,
            id="orders.delete_expired",
            commands=[
                TaskCommand(method="orders.delete", params={"conditions": {"expired": True}}),
                TaskCommand(method="cache.clear", params=None),
            ],
        )
    )
    task = await finished(runtime, task["id"])
    assert task["result"] == [{"deleted": 3}, True]
    assert orders.methods() == ["orders.delete", "cache.clear"]


async def test_sharing_data_between_stages(runtime, orders):
    task = await runtime.tasks.create(
        Task(
            id="my_task",
            commands=[
                TaskCommand(method="items.m_get", params={"conditions": {"marked": True}}),
                TaskCommand(method="[kws.command_name]", params={"id": "[0.data.id]"}),
            ],
            kws={"command_name": "items.m_delete"},
        )
    )
    task = await finished(runtime, task["id"])
    assert task["result"][1] == {"deleted": ["001", "005", "101"]}


@pytest.mark.parametrize(("count", "refreshed"), [(1000, True), (0, False)])
async def test_conditions_run_or_skip_a_stage(runtime, orders, app, count, refreshed):
    app.count = count
    task = await runtime.tasks.create(
        Task(
            app=self.app.name,
            id="products.update_prices",
            commands=[
                TaskCommand(method="settings.get"),
                TaskCommand(method="products.update_attributes"),
                TaskCommand(
                    method="products_cache.refresh",
                    condition=Condition({"1.count": {"gt": "[0.cache.update_threshold]"}}),
                ),
            ],
        )
    )
    task = await finished(runtime, task["id"])
    assert task["status"] == "FINISHED"
    assert task["result"][2] == ("refreshed" if refreshed else None)
    assert ("products_cache.refresh" in orders.methods()) is refreshed


async def test_timers_pause_the_task_and_free_the_executor(runtime, orders):
    task = await runtime.tasks.create(
        Task(
            app=self.app.name,
            id="orders.delete_expired",
            commands=[
                TaskCommand(method="orders.delete", params={"conditions": {"expired": True}}),
                Timer(1),
                TaskCommand(method="cache.clear", params=None),
            ],
        )
    )
    deadline = time.monotonic() + 10
    while (waiting := await runtime.tasks.get(task["id"]))["status"] != "WAITING":
        assert time.monotonic() < deadline, f"the task is still {waiting['status']}"
        await asyncio.sleep(0.02)
    # Parked: no executor holds it while the timer runs.
    assert (waiting["stage"], waiting["executor_id"]) == (1, None)
    assert runtime.executor is not None
    await testing.eventually(lambda: runtime.executor.active == 0, what="the executor to be free")
    task = await finished(runtime, task["id"])
    assert task["result"] == [{"deleted": 3}, None, True]


async def test_messages_resume_the_task_with_their_data(runtime, orders):
    task = await runtime.tasks.create(
        Task(
            app=self.app.name,
            id="orders.delete_expired",
            commands=[
                TaskCommand(method="statistics.request_report", params={"callback_id": "[id]"}),
                Message(max_timeout=None),
                TaskCommand(method="files.download", params={"url": "[1.url]"}),
            ],
        )
    )
    deadline = time.monotonic() + 10
    while (await runtime.tasks.get(task["id"]))["status"] != "WAITING":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await runtime.tasks.write_message(
        "orders.delete_expired", {"url": "http://statistics.example/reports/324934"}
    )
    task = await finished(runtime, task["id"])
    assert task["result"] == [
        {"requested_for": "orders.delete_expired"},
        {"url": "http://statistics.example/reports/324934"},
        {"downloaded": "http://statistics.example/reports/324934"},
    ]


async def test_retries(runtime, orders):
    task = await runtime.tasks.create(
        Task(
            id="server.sync",
            commands=[{"method": "server.sync"}],
            max_retries=3,
            restart_policy="CURRENT",
        )
    )
    task = await finished(runtime, task["id"])
    assert (task["status"], task["retries"], task["result"]) == ("FINISHED", 2, ["synced"])


async def test_periodic_tasks(runtime, orders):
    task = await runtime.tasks.create(
        Task(
            id="cache.update",
            commands=[TaskCommand(method="cache.update")],
            cron="* * * * * *",  # every second (croniter's seconds field)
            notify=True,
        )
    )
    notifications = NotificationService(runtime.store)
    deadline = time.monotonic() + 15
    while True:
        page = await notifications.list(conditions={"task_id": task["id"]}, columns=["job_id"])
        if page["count"] >= 2:
            break
        assert time.monotonic() < deadline, "cron did not run twice"
        await asyncio.sleep(0.1)
    assert len({n["job_id"] for n in page["data"]}) == page["count"]  # a fresh job_id per run


async def test_results_and_notifications(runtime, orders):
    my_task = await runtime.tasks.create(
        Task(commands=[TaskCommand(method="do.something")], notify=True)
    )
    await finished(runtime, my_task["id"])
    data = await runtime.tasks.get(id=my_task["id"], columns=["result", "exit_code", "error"])
    assert data == {"result": [1], "exit_code": 0, "error": None}
    notifications = runtime.notifications
    task = await runtime.tasks.get(my_task["id"])
    page = await notifications.list(
        conditions={"task_id": task["id"], "job_id": task["job_id"]},
        columns=["result"],
    )
    assert page["data"] == [{"result": [1]}]


async def test_chaining_tasks(runtime, orders):
    next_task = await runtime.tasks.create(
        Task(commands=[TaskCommand(method="do.something.else")], enabled=False)
    )
    await runtime.tasks.update(next_task["id"], {"enabled": True, "cron": None})
    await finished(runtime, next_task["id"])
    first_job = (await runtime.tasks.get(next_task["id"]))["job_id"]
    task = await runtime.tasks.create(
        Task(commands=[TaskCommand(method="do.something")], next_task=next_task["id"])
    )
    await finished(runtime, task["id"])
    deadline = time.monotonic() + 10
    while (await runtime.tasks.get(next_task["id"]))["job_id"] == first_job:
        assert time.monotonic() < deadline, "the next task was not started"
        await asyncio.sleep(0.02)
    assert (await finished(runtime, next_task["id"]))["result"] == [2]


async def test_resetting_tasks(runtime, orders):
    task = await runtime.tasks.create(
        Task(id="my_task_id", commands=[TaskCommand(method="do.something")])
    )
    first = await finished(runtime, task["id"])
    await runtime.tasks.reset(id="my_task_id")
    again = await finished(runtime, task["id"])
    assert again["job_id"] != first["job_id"]
    assert again["result"] == [1]


async def test_log_tracing_by_job_id(runtime, orders, caplog):
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(logs.TaskContextFilter())
    task = await runtime.tasks.create(
        Task(commands=[TaskCommand(method="do.something"), TaskCommand(method="cache.clear")])
    )
    task = await finished(runtime, task["id"])
    # The correlation id on every call.
    assert {c.headers.get("X-Correlation-Id") for c in orders.calls} == {task["job_id"]}
    # The executor logs "Task finished" right after the commit that the wait above saw.
    mine = await testing.eventually(
        lambda: [r for r in caplog.records if getattr(r, "task_id", None) == task["id"]],
        within=5,
        what="a log record of the task",
    )
    assert {r.job_id for r in mine} == {task["job_id"]}
