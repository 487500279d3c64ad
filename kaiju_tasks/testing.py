"""FrozenClock and task factories: public helpers for testing code that uses kaiju-tasks."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from kaiju_tasks import models
from kaiju_tasks.store import base

DEFAULT_NOW = datetime(2030, 1, 1, tzinfo=UTC)


async def eventually(
    predicate: Callable[[], Any | Awaitable[Any]],
    *,
    within: float = 30.0,
    interval: float = 0.02,
    what: str = "condition",
) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that.

    Raises AssertionError naming ``what`` when ``within`` seconds pass first. For tests that
    wait on real executors, managers and databases, where only the outcome can be awaited.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached in {within:g} s")
        await asyncio.sleep(interval)


class FrozenClock:
    """A clock that stands still until moved."""

    def __init__(self, now: datetime = DEFAULT_NOW) -> None:
        if now.tzinfo is None:
            raise ValueError("FrozenClock needs an aware datetime")
        self._now = now

    def now(self) -> datetime:
        """Return the frozen time."""
        return self._now

    def set(self, now: datetime) -> None:
        """Jump to ``now``."""
        self._now = now

    def advance(self, delta: timedelta | float) -> datetime:
        """Move forward by ``delta`` (a timedelta or seconds) and return the new time."""
        if not isinstance(delta, timedelta):
            delta = timedelta(seconds=delta)
        self._now += delta
        return self._now


def task_row(now: datetime, **overrides: Any) -> dict[str, Any]:
    """Return a complete task row, any column overridable, for ``TaskStore.insert_full``."""
    commands = overrides.pop("commands", [{"method": "test.noop", "params": None}])
    commands = [
        c.to_json()
        if isinstance(c, models.TaskCommand | models.Timer | models.Message)
        else models.parse_commands([c])[0].to_json()
        for c in commands
    ]
    row: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "app_name": models.DEFAULT_APP,
        "commands": commands,
        "kws": {},
        "enabled": True,
        "cron": None,
        "max_exec_timeout": models.Limit.DEFAULT_T.value,
        "max_retries": 0,
        "retries": 0,
        "restart_policy": "CURRENT",
        "retry_delay": 0,
        "next_task": None,
        "notify": False,
        "system": False,
        "description": None,
        "meta": {},
        "priority": 0,
        "status": "IDLE",
        "stage": 0,
        "stages": len(commands),
        "result": [],
        "error": None,
        "exit_code": None,
        "job_id": None,
        "user_id": None,
        "executor_id": None,
        "created": now,
        "queued_at": None,
        "exec_deadline": None,
        "wait_deadline": None,
        "next_run": now,
        "status_change": now,
        "expires_at": None,
        "parent_id": None,
        "root_id": None,
        "requeues": 0,
        "claim_id": None,
    }
    row.update(overrides)
    if row["root_id"] is None:
        row["root_id"] = row["id"]
    return row


async def make_task(store: base.TaskStore, now: datetime, **overrides: Any) -> dict[str, Any]:
    """Write a task in any state, even one the API cannot reach, and return its row."""
    return await store.insert_full(task_row(now, **overrides))


def notification_row(now: datetime, **overrides: Any) -> Mapping[str, Any]:
    """Return a notification row for ``TaskStore.insert_notification``."""
    row: dict[str, Any] = {
        "task_id": "task",
        "job_id": str(uuid.uuid4()),
        "status": "FINISHED",
        "result": [],
        "exit_code": 0,
        "error": None,
        "user_id": None,
        "created": now,
    }
    row.update(overrides)
    return row
