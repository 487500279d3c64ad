"""A stage failure and an internal error are each logged once, with the task as fields.

Error trackers' logging integrations (Sentry's, structlog's) group records by their fields and
turn ERROR records with a traceback into issues: a bug in a stage method must be one such
record, and a failed stage one record without a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import timedelta
from typing import Any

import pytest

from kaiju_tasks import Task, TaskCommand, TaskRuntime, conditions, logs, methods
from kaiju_tasks.rpc import calls, protocol
from kaiju_tasks.rpc import server as rpc_server
from tests import rpc_fake

pytestmark = pytest.mark.timeout(60)

FIELDS = ("task_id", "job_id", "app", "stage", "method", "executor_id")
EVENTS = ("stage_failed", "stage_error", "pipeline_error", "task_crashed")


async def _failed(runtime: TaskRuntime, task_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        task = await runtime.tasks.get(task_id)
        if task["status"] == "FAILED":
            return task
        assert time.monotonic() < deadline, task["status"]
        await asyncio.sleep(0.02)


def _records(caplog: pytest.LogCaptureFixture, task_id: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if getattr(r, "task_id", None) == task_id
        and r.levelno >= logging.INFO
        and getattr(r, "event", None) in EVENTS
    ]


def _loud(caplog: pytest.LogCaptureFixture, task_id: str) -> list[logging.LogRecord]:
    """Every WARNING or ERROR record about the task, whatever its event."""
    return [
        r
        for r in caplog.records
        if getattr(r, "task_id", None) == task_id and r.levelno >= logging.WARNING
    ]


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in FIELDS}


def _executor_id(runtime: TaskRuntime) -> str:
    assert runtime.executor is not None
    return runtime.executor.id


async def test_each_failure_is_one_record_with_the_task_as_fields(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = methods.Methods()

    @registry.register("shop.buggy")
    async def buggy() -> None:
        raise ZeroDivisionError("a bug in the method")

    @registry.register("shop.refused")
    async def refused() -> None:
        raise methods.MethodError("card declined", retryable=False)

    caplog.set_level(logging.INFO, logger="kaiju_tasks")
    async with TaskRuntime(
        dsn,
        apps=["shop"],
        methods=registry,
        executor_options={"poll_interval": timedelta(milliseconds=50)},
    ) as runtime:
        bug = await runtime.tasks.create(
            Task(app="shop", commands=[TaskCommand(method="shop.buggy")])
        )
        declined = await runtime.tasks.create(
            Task(
                app="shop",
                max_retries=1,
                commands=[TaskCommand(method="shop.refused")],
            )
        )
        assert isinstance(bug, dict)
        assert isinstance(declined, dict)
        bug_task = await _failed(runtime, bug["id"])
        declined_task = await _failed(runtime, declined["id"])
        executor_id = _executor_id(runtime)

    [record] = _records(caplog, bug["id"])  # exactly one
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ZeroDivisionError)
    assert _fields(record) == {
        "task_id": bug["id"],
        "job_id": bug_task["job_id"],
        "app": "shop",
        "stage": 0,
        "method": "shop.buggy",
        "executor_id": executor_id,  # without TaskContextFilter: a field of its own
    }
    [record] = _records(caplog, declined["id"])  # not retryable: one failure, final
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert record.getMessage() == "Stage failed"
    assert getattr(record, "method") == "shop.refused"  # noqa: B009 - an extra field
    assert getattr(record, "status") == "FAILED"  # noqa: B009 - an extra field
    assert declined_task["error"]["message"] == "card declined"


async def test_an_internal_error_of_the_executor_is_one_pipeline_error_with_the_task_as_fields(
    dsn: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The executor's own code fails, outside any stage call: conditions.evaluate raises what
    # no condition should (a bug in kaiju-tasks, not in the task or the method).
    evaluate = conditions.evaluate

    def broken(spec: Any, data: Any, **options: Any) -> bool:
        if spec == {"kws.crash": True}:
            raise RuntimeError("a bug in the executor")
        return evaluate(spec, data, **options)

    monkeypatch.setattr(conditions, "evaluate", broken)
    registry = methods.Methods()
    registry.register("shop.first")(lambda: 1)
    registry.register("shop.second")(lambda: 2)
    caplog.set_level(logging.INFO, logger="kaiju_tasks")
    async with TaskRuntime(
        dsn,
        apps=["shop"],
        methods=registry,
        executor_options={"poll_interval": timedelta(milliseconds=50)},
    ) as runtime:
        created = await runtime.tasks.create(
            Task(
                app="shop",
                max_retries=2,  # an internal error is not retried
                kws={"crash": True},
                commands=[
                    TaskCommand(method="shop.first"),
                    TaskCommand(method="shop.second", condition={"kws.crash": True}),
                ],
            )
        )
        assert isinstance(created, dict)
        task = await _failed(runtime, created["id"])
        executor_id = _executor_id(runtime)

    assert task["error"]["message"] == "internal error: RuntimeError: a bug in the executor"
    assert task["retries"] == 0
    [record] = _loud(caplog, created["id"])  # nothing else at WARNING or above
    assert record.levelno == logging.ERROR
    assert vars(record)["event"] == "pipeline_error"
    assert record.getMessage() == "Task pipeline failed"
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)
    assert _fields(record) == {
        "task_id": created["id"],
        "job_id": task["job_id"],
        "app": "shop",
        "stage": 1,
        "method": "shop.second",
        "executor_id": executor_id,
    }
    assert vars(record)["status"] == "FAILED"


async def test_a_remote_failure_retried_is_logged_once_per_attempt(
    dsn: str, caplog: pytest.LogCaptureFixture, rpc_target: Any
) -> None:
    def answer(call: rpc_fake.Call) -> Any:
        raise rpc_fake.Fault(-32000, "out of stock")

    target = await rpc_target(answer)
    caplog.set_level(logging.INFO, logger="kaiju_tasks")
    async with TaskRuntime(
        dsn,
        apps=["shop"],
        app_urls={"shop": target.url},
        manager_options={"interval": timedelta(milliseconds=50)},
        executor_options={"poll_interval": timedelta(milliseconds=50)},
    ) as runtime:
        created = await runtime.tasks.create(
            Task(app="shop", max_retries=2, commands=[TaskCommand(method="shop.reserve")])
        )
        assert isinstance(created, dict)
        task = await _failed(runtime, created["id"])
        executor_id = _executor_id(runtime)

    assert len(target.called("shop.reserve")) == 3
    records = _records(caplog, created["id"])
    assert [(r.levelno, vars(r)["status"], vars(r)["retries"]) for r in records] == [
        (logging.INFO, "QUEUED", 0),
        (logging.INFO, "QUEUED", 1),
        (logging.WARNING, "FAILED", 2),
    ]
    for record in records:
        assert record.getMessage() == "Stage failed"
        assert vars(record)["event"] == "stage_failed"
        assert record.exc_info is None  # an answer, not a bug: no traceback
        assert vars(record)["error"] == "out of stock"
        fields = _fields(record)
        # Each attempt has its own job_id (a retry is a new run): only the last is on the task.
        assert fields.pop("job_id")
        assert fields == {
            "task_id": created["id"],
            "app": "shop",
            "stage": 0,
            "method": "shop.reserve",
            "executor_id": executor_id,
        }
    assert vars(records[-1])["job_id"] == task["job_id"]
    assert _loud(caplog, created["id"]) == records[-1:]


async def test_task_context_filter_keeps_the_executor_of_a_failure(
    dsn: str, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    # The filter sets what a record lacks from the running stage's context, which is reset
    # before the failure is written: the record's own executor_id must be the one kept.
    registry = methods.Methods()

    @registry.register("shop.buggy")
    async def buggy() -> None:
        raise KeyError("price")

    context_filter = logs.TaskContextFilter()
    caplog.handler.addFilter(context_filter)
    request.addfinalizer(lambda: caplog.handler.removeFilter(context_filter))
    caplog.set_level(logging.INFO, logger="kaiju_tasks")
    async with TaskRuntime(
        dsn,
        apps=["shop"],
        methods=registry,
        executor_options={"poll_interval": timedelta(milliseconds=50)},
    ) as runtime:
        created = await runtime.tasks.create(
            Task(app="shop", commands=[TaskCommand(method="shop.buggy")])
        )
        assert isinstance(created, dict)
        await _failed(runtime, created["id"])
        executor_id = _executor_id(runtime)

    [record] = _records(caplog, created["id"])
    assert vars(record)["event"] == "stage_error"
    assert vars(record)["executor_id"] == executor_id
    line = logs.JsonFormatter().format(record)
    assert f'"executor_id": "{executor_id}"' in line


# -- internal errors of the HTTP server -----------------------------------------------------------


@pytest.fixture
async def served(aiohttp_client: Any, make_api: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The HTTP API serving ``shop.buggy`` (a bug), and a function posting one call to it."""
    monkeypatch.setattr(calls, "_LAST_TRACEBACK", {})  # no traceback logged yet
    registry = methods.Methods()

    @registry.register("shop.buggy", public=True)
    def buggy(text: str = "a bug in the method") -> None:
        raise KeyError(text)

    api = make_api(methods=registry)
    client = await aiohttp_client(rpc_server.create_app(api))
    token = (await api.tokens.create("alice"))["token"]

    async def post(request_id: Any, headers: dict[str, str] | None = None, **params: Any) -> Any:
        body = {"jsonrpc": "2.0", "id": request_id, "method": "shop.buggy", "params": params}
        response = await client.post(
            "/public/rpc",
            data=json.dumps(body),
            headers={"Authorization": f"Bearer {token}", **(headers or {})},
        )
        return await response.json()

    post.api = api  # type: ignore[attr-defined]
    post.token = token  # type: ignore[attr-defined]
    return post


def _rpc_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if vars(r).get("event") == "rpc_error"]


async def test_an_executors_call_that_fails_inside_the_server_logs_its_task_as_fields(
    served: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="kaiju_tasks.rpc.server")
    # What an executor sends: the id task:job:stage:retries, the job_id as correlation id.
    job = "0b7c4f7e-3b1f-4c1e-9d55-2f0d6f1a9e21"
    headers = {protocol.CORRELATION_HEADER: job}
    first = await served(f"orders:sync:{job}:2:1", headers)
    second = await served(f"orders:sync:{job}:2:2", headers, text="x" * 100_000)
    assert first["error"] == second["error"] == {"code": -32603, "message": "internal error"}

    records = _rpc_errors(caplog)
    assert len(records) == 2  # one per call
    for record in records:
        assert record.levelno == logging.ERROR
        assert record.msg == "RPC method failed: %s: %s"  # one template: one group
        assert {key: vars(record).get(key) for key in ("method", *FIELDS[:4])} == {
            "method": "shop.buggy",
            "task_id": "orders:sync",  # a task id may hold colons
            "job_id": job,
            "app": None,  # not known to the server
            "stage": 2,
        }
    traced, untraced = records
    # The exception itself, for error trackers; the text a formatter writes is bounded.
    assert traced.exc_info is not None
    assert isinstance(traced.exc_info[1], KeyError)
    assert "Traceback" not in traced.getMessage()
    line = caplog.handler.format(traced)
    assert "in buggy" in line
    assert line.endswith("KeyError: 'a bug in the method'")
    # The next traceback of this method waits a minute: the second call's record has none.
    assert untraced.exc_info is None
    assert "Traceback" not in caplog.handler.format(untraced)
    assert len(caplog.handler.format(untraced)) < 1000


async def test_other_calls_that_fail_inside_the_server_log_what_they_say_of_their_task(
    served: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="kaiju_tasks.rpc.server")
    await served(1)  # not an executor's call: no task fields
    await served("not:an:executor's")
    # The X-Correlation-Id header, as the server's handler passes it on: cut to 64 characters.
    raw = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "shop.buggy"}).encode()
    await calls.respond(served.api, raw, served.api.tokens, served.token, correlation_id="j" * 500)
    plain, odd, correlated = _rpc_errors(caplog)
    for record in (plain, odd):
        assert [vars(record).get(key) for key in ("task_id", "job_id", "stage")] == [None] * 3
    assert vars(correlated)["job_id"] == "j" * calls.MAX_CORRELATION_ID
    assert vars(correlated).get("task_id") is None
