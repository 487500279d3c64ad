"""procrastinate: producer side (Task.batch_defer_async / defer_async) and worker side.

Idiomatic API as documented for procrastinate 3.x: ``App(connector=PsycopgConnector(
conninfo=...))``, tasks declared with ``@app.task(name=...)``, ``async with app.open_async()``,
``app.schema_manager.apply_schema_async()`` (what ``procrastinate schema --apply`` runs),
``task.batch_defer_async(*kwargs)`` for bulk, ``task.defer_async(**kwargs)`` for one job and
``app.run_worker_async(concurrency=...)`` for the worker. A pipeline is chained by deferring the
next task from each task.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import procrastinate

from bench import common


class _Tasks:
    def __init__(
        self,
        dsn: str,
        reporter: common.Reporter | None,
        remote: common.RpcClient | None = None,
    ) -> None:
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))
        app = self.app

        # Remote modes: every task POSTs its stage to the service (one session per worker).
        async def step(x: int) -> int:
            if remote is None:
                return x + 1
            result = await remote.call("step", {"x": x})
            return int(result["x"])

        @app.task(name="noop")
        async def noop(t0: float | None = None) -> None:
            if remote is not None:
                await remote.call("noop")
            if reporter is not None:
                if t0 is not None:
                    reporter.latency(t0)
                reporter.final()

        @app.task(name="step1")
        async def step1(x: int) -> None:
            await step2.defer_async(x=await step(x))

        @app.task(name="step2")
        async def step2(x: int) -> None:
            await step3.defer_async(x=await step(x))

        @app.task(name="step3")
        async def step3(x: int) -> None:
            if remote is not None:
                await step(x)
            if reporter is not None:
                reporter.final()

        self.noop = noop
        self.step1 = step1


class ProcrastinatePeer:
    name = "procrastinate"
    database = "bench_procrastinate"

    def __init__(self) -> None:
        self.tasks: _Tasks | None = None
        self._opened: Any = None

    async def install(self, dsn: str) -> None:
        tasks = _Tasks(dsn, None)
        async with tasks.app.open_async():
            await tasks.app.schema_manager.apply_schema_async()

    async def open(self, dsn: str) -> None:
        self.tasks = _Tasks(dsn, None)
        await self.tasks.app.open_async()

    async def close(self) -> None:
        if self.tasks is not None:
            await self.tasks.app.connector.close_async()

    async def enqueue_noop(self, n: int) -> None:
        assert self.tasks is not None
        await self.tasks.noop.batch_defer_async(*({} for _ in range(n)))

    async def enqueue_latency(self, t0: float) -> None:
        assert self.tasks is not None
        await self.tasks.noop.defer_async(t0=t0)

    async def enqueue_pipelines(self, n: int) -> None:
        assert self.tasks is not None
        first: dict[str, Any] = {"x": 1}
        await self.tasks.step1.batch_defer_async(*(first for _ in range(n)))

    def done_query(self, mode: str) -> tuple[str, int]:
        stages = common.PIPELINE_STAGES if common.is_pipeline(mode) else 1
        return "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'", stages


async def run_worker(
    dsn: str,
    mode: str,
    reporter: common.Reporter,
    stop: asyncio.Event,
    *,
    concurrency: int,
    trace: bool = False,
    service_url: str | None = None,
) -> None:
    remote = common.RpcClient(service_url) if service_url else None
    tasks = _Tasks(dsn, reporter, remote)
    try:
        async with tasks.app.open_async():
            reporter.ready()
            runner = asyncio.create_task(
                tasks.app.run_worker_async(concurrency=concurrency, install_signal_handlers=False)
            )
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not runner.done():
                # procrastinate: cancelling the worker task shuts it down gracefully
                runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(runner, timeout=15)
    finally:
        if remote is not None:
            await remote.close()
