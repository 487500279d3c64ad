"""Stopping a runtime while tasks keep arriving: every claimed task is started or handed back."""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import timedelta

import pytest

from kaiju_tasks import Methods, Task, TaskCommand, TaskRuntime
from kaiju_tasks.testing import eventually

pytestmark = pytest.mark.timeout(180)

ROUNDS = 6


async def test_stop_during_a_stream_of_creates_leaves_no_task_executed(dsn, task_service, store):
    methods = Methods()

    @methods.register("stream.work")
    async def work(n: int) -> int:
        await asyncio.sleep(0.01)
        return n

    rng = random.Random(12)
    counter = 0

    async def stream() -> None:
        nonlocal counter
        while True:
            batch = [
                Task(app="stream", commands=[TaskCommand(method="stream.work", params={"n": i})])
                for i in range(counter, counter + 5)
            ]
            counter += 5
            await task_service.create(batch, columns=["id"])
            await asyncio.sleep(0)

    left: dict[str, int] = {}
    for _ in range(ROUNDS):
        runtime = TaskRuntime(
            dsn,
            apps=["stream"],
            methods=methods,
            manager=False,  # nobody rescues: the executor must hand back on its own
            apply_migrations=False,
            executor_options={
                "concurrency": 4,
                "poll_interval": timedelta(seconds=0.05),
                "shutdown_grace": timedelta(seconds=0.2),
            },
        )
        await runtime.start()
        assert runtime.executor is not None
        executor_id = runtime.executor.id
        creating = asyncio.create_task(stream())
        await eventually(lambda: counter > 0, what="creates to start")
        await asyncio.sleep(rng.uniform(0.5, 2.0))  # the moment of the stop, not a wait
        await runtime.stop()
        creating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await creating
        page = await task_service.list(
            conditions={"status": "EXECUTED", "executor_id": executor_id}, limit=1
        )
        left[executor_id] = page["count"]
        # Handed-back tasks are SUSPENDED until a manager re-queues them; none is EXECUTED.
    assert left == dict.fromkeys(left, 0)
    executed = await task_service.list(conditions={"status": "EXECUTED"}, limit=1)
    assert executed["count"] == 0
