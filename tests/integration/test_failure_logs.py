"""A stage failure and an internal error are each logged once, with the task as fields.

Error trackers' logging integrations (Sentry's, structlog's) group records by their fields and
turn ERROR records with a traceback into issues: a bug in a stage method must be one such
record, and a failed stage one record without a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from typing import Any

import pytest

from kaiju_tasks import Task, TaskCommand, TaskRuntime, methods

pytestmark = pytest.mark.timeout(60)

FIELDS = ("task_id", "job_id", "app", "stage", "method")


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
        and getattr(r, "event", None) in ("stage_failed", "stage_error", "task_crashed")
    ]


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

    [record] = _records(caplog, bug["id"])  # exactly one
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ZeroDivisionError)
    fields = {name: getattr(record, name) for name in FIELDS}
    assert fields == {
        "task_id": bug["id"],
        "job_id": bug_task["job_id"],
        "app": "shop",
        "stage": 0,
        "method": "shop.buggy",
    }
    [record] = _records(caplog, declined["id"])  # not retryable: one failure, final
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert record.getMessage() == "Stage failed"
    assert getattr(record, "method") == "shop.refused"  # noqa: B009 - an extra field
    assert getattr(record, "status") == "FAILED"  # noqa: B009 - an extra field
    assert declined_task["error"]["message"] == "card declined"
