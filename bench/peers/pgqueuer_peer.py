"""pgqueuer: producer side (Queries.enqueue with lists) and worker side (PgQueuer.run).

Idiomatic API as documented for pgqueuer 1.x: ``Queries(AsyncpgDriver(conn)).install()`` (what
``pgq install`` runs), ``Queries.enqueue(entrypoints, payloads, priorities)`` for a batch,
``PgQueuer(AsyncpgDriver(conn))`` with ``@pgq.entrypoint(name)`` handlers and ``pgq.run(...)``
(what ``pgq run`` runs). A pipeline is chained by enqueueing the next job from each handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from datetime import timedelta
from typing import Any

import asyncpg
from pgqueuer import AsyncpgDriver, AsyncpgPoolDriver, Job, PgQueuer, Queries

from bench import common

# Two configurations, two rows of the results:
# - `pgqueuer`: one worker with at most `concurrency` (10) jobs in flight, as the others.
#   `max_concurrent_tasks` is pgqueuer's per-worker cap, and it requires
#   max_concurrent_tasks >= 2 * batch_size, so the largest batch for a cap of 10 is 5.
# - `pgqueuer-defaults`: what `pgq run` gives a user who sets nothing: `PgQueuer.run()`'s
#   defaults (batch_size=10, no cap on jobs in flight) on uvloop, which `pgq run` uses whenever
#   it is installed (pgqueuer depends on it). See bench/worker.py.
# Overrides for experiments (not used by the default run):
#   BENCH_PGQ_BATCH_SIZE      dequeue batch size (default: concurrency // 2; defaults row: 10)
#   BENCH_PGQ_MAX_CONCURRENT  max_concurrent_tasks (default: concurrency; 0 = unlimited;
#                             defaults row: unlimited)
#   BENCH_PGQ_HANDLER_POOL    1 (default): handlers enqueue through their own pool;
#                             0: through the worker's own single-connection driver
#   BENCH_PGQ_UVLOOP          defaults row only: 1 (default) as `pgq run`; 0: asyncio's loop


def _payload(**data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


class PgQueuerPeer:
    name = "pgqueuer"
    database = "bench_pgqueuer"

    def __init__(self, *, defaults: bool = False) -> None:
        if defaults:
            self.name = "pgqueuer-defaults"
            self.database = "bench_pgqueuer_defaults"
        self.connection: asyncpg.Connection | None = None
        self.queries: Queries | None = None

    async def install(self, dsn: str) -> None:
        connection = await asyncpg.connect(dsn)
        try:
            await Queries(AsyncpgDriver(connection)).install()
        finally:
            await connection.close()

    async def open(self, dsn: str) -> None:
        self.connection = await asyncpg.connect(dsn)
        self.queries = Queries(AsyncpgDriver(self.connection))

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()

    async def enqueue_noop(self, n: int) -> None:
        assert self.queries is not None
        await self.queries.enqueue(["noop"] * n, [None] * n, [0] * n)

    async def enqueue_latency(self, t0: float) -> None:
        assert self.queries is not None
        await self.queries.enqueue("noop", _payload(t0=t0))

    async def enqueue_pipelines(self, n: int) -> None:
        assert self.queries is not None
        first = _payload(x=1)
        await self.queries.enqueue(["step1"] * n, [first] * n, [0] * n)

    def done_query(self, mode: str) -> tuple[str, int]:
        # A finished job is deleted from `pgqueuer` and logged once in `pgqueuer_log`.
        stages = common.PIPELINE_STAGES if common.is_pipeline(mode) else 1
        return "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'", stages


async def run_worker(
    dsn: str,
    mode: str,
    reporter: common.Reporter,
    stop: asyncio.Event,
    *,
    concurrency: int,
    trace: bool = False,
    service_url: str | None = None,
    defaults: bool = False,
) -> None:
    if defaults:  # PgQueuer.run()'s own defaults, as `pgq run` without options
        batch_size = int(os.environ.get("BENCH_PGQ_BATCH_SIZE", 10))
        max_concurrent = int(os.environ.get("BENCH_PGQ_MAX_CONCURRENT", 0))
    else:
        batch_size = int(os.environ.get("BENCH_PGQ_BATCH_SIZE", max(1, concurrency // 2)))
        max_concurrent = int(os.environ.get("BENCH_PGQ_MAX_CONCURRENT", concurrency))
    own_pool = os.environ.get("BENCH_PGQ_HANDLER_POOL", "1") == "1"
    connection = await asyncpg.connect(dsn)
    driver = AsyncpgDriver(connection)
    pgq = PgQueuer(driver)
    # Handlers enqueue the next stage through their own small pool, so that they do not queue
    # behind the worker's single dequeue/log connection (faster than sharing it; see README).
    enqueue_pool = await asyncpg.create_pool(dsn, min_size=1, max_size=concurrency)
    assert enqueue_pool is not None
    producer = Queries(AsyncpgPoolDriver(enqueue_pool)) if own_pool else Queries(driver)
    # Remote modes: every handler POSTs its stage to the service (one session per worker).
    remote = common.RpcClient(service_url) if service_url else None

    async def step(x: int) -> int:
        if remote is None:
            return x + 1
        result = await remote.call("step", {"x": x})
        return int(result["x"])

    @pgq.entrypoint("noop")
    async def noop(job: Job) -> None:
        if remote is not None:
            await remote.call("noop")
        if job.payload:
            reporter.latency(json.loads(job.payload)["t0"])
        reporter.final()

    @pgq.entrypoint("step1")
    async def step1(job: Job) -> None:
        x = json.loads(job.payload or b"{}")["x"]
        await producer.enqueue("step2", _payload(x=await step(x)))

    @pgq.entrypoint("step2")
    async def step2(job: Job) -> None:
        x = json.loads(job.payload or b"{}")["x"]
        await producer.enqueue("step3", _payload(x=await step(x)))

    @pgq.entrypoint("step3")
    async def step3(job: Job) -> None:
        if remote is not None:
            await step(json.loads(job.payload or b"{}")["x"])
        reporter.final()

    try:
        reporter.ready()
        runner = asyncio.create_task(
            pgq.run(
                batch_size=batch_size,
                max_concurrent_tasks=max_concurrent or None,
                dequeue_timeout=timedelta(seconds=30),
            )
        )
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
        pgq.shutdown.set()
        stopper.cancel()
        try:
            await asyncio.wait_for(runner, timeout=10)
        except TimeoutError:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
    finally:
        if remote is not None:
            await remote.close()
        await enqueue_pool.close()
        if not connection.is_closed():
            await connection.close()
