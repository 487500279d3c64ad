"""kaiju-tasks: producer side (TaskService.create) and worker side (one Executor)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench import common
from kaiju_tasks import Task, TaskCommand, TaskService
from kaiju_tasks.executor import Executor
from kaiju_tasks.methods import Methods
from kaiju_tasks.service import MAX_BULK
from kaiju_tasks.store import migrate, postgres

APP = "bench"

# What the producer hands to TaskService.create, both documented: "dicts" (the default) are
# tasks as plain dicts, the shape the JSON-RPC API takes and a web backend already holds;
# "models" builds Task and TaskCommand objects first (validated when built, in the caller's code).
#   BENCH_KAIJU_INPUT  dicts (default) | models
INPUT = os.environ.get("BENCH_KAIJU_INPUT", "dicts")
if INPUT not in ("dicts", "models"):
    raise SystemExit(f"BENCH_KAIJU_INPUT is dicts or models, not {INPUT!r}")


def _noop_task(t0: float | None = None) -> Task | dict[str, Any]:
    params = None if t0 is None else {"t0": t0}
    if INPUT == "dicts":
        return {"app": APP, "commands": [{"method": "noop", "params": params}]}
    return Task(app=APP, commands=[TaskCommand(method="noop", params=params)])


def _pipeline_task() -> Task | dict[str, Any]:
    if INPUT == "dicts":
        return {
            "app": APP,
            "commands": [
                {"method": "step", "params": {"x": 1}},
                {"method": "step", "params": {"x": "[0.x]"}},
                {"method": "step", "params": {"x": "[1.x]"}},
            ],
        }
    return Task(
        app=APP,
        commands=[
            TaskCommand(method="step", params={"x": 1}),
            TaskCommand(method="step", params={"x": "[0.x]"}),
            TaskCommand(method="step", params={"x": "[1.x]"}),
        ],
    )


class Kaiju:
    name = "kaiju"
    database = "bench_kaiju"

    def __init__(self) -> None:
        self.pool: Any = None
        self.service: TaskService | None = None

    async def install(self, dsn: str) -> None:
        await migrate.migrate(dsn)

    async def open(self, dsn: str) -> None:
        self.pool = await postgres.create_pool(dsn, min_size=1, max_size=2)
        self.service = TaskService(postgres.PostgresTaskStore(self.pool))

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def _create_many(self, n: int, build: Callable[[], Task | dict[str, Any]]) -> None:
        assert self.service is not None
        done = 0
        while done < n:
            size = min(MAX_BULK, n - done)
            # n copies of one job, as the peers enqueue theirs (["noop"] * n, one payload object):
            # create validates and stores every item on its own, so sharing one saves only the
            # caller's time to build 10,000 equal dicts.
            await self.service.create([build()] * size, columns=["id"])
            done += size

    async def enqueue_noop(self, n: int) -> None:
        await self._create_many(n, _noop_task)

    async def enqueue_latency(self, t0: float) -> None:
        assert self.service is not None
        await self.service.create(_noop_task(t0), columns=["id"])

    async def enqueue_pipelines(self, n: int) -> None:
        await self._create_many(n, _pipeline_task)

    def done_query(self, mode: str) -> tuple[str, int]:
        return "SELECT count(*) FROM tasks WHERE status = 'FINISHED'", 1  # a pipeline is a task


# -- worker ------------------------------------------------------------------------------------


class _StoreTimer:
    """Wraps store coroutine methods to record call counts and time spent awaiting them."""

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = {}
        self.claimed: list[int] = []

    def wrap(self, store: Any, name: str) -> None:
        original: Callable[..., Awaitable[Any]] = getattr(store, name)
        bucket = self.stats.setdefault(name, [0, 0.0])

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                result = await original(*args, **kwargs)
            finally:
                bucket[0] += 1
                bucket[1] += time.perf_counter() - start
            if name == "claim":
                self.claimed.append(len(result))
            return result

        setattr(store, name, timed)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            name: {"calls": int(c), "total_s": round(t, 4), "avg_ms": round(1000 * t / c, 3)}
            for name, (c, t) in self.stats.items()
            if c
        }
        if self.claimed:
            out["claim_batch"] = {
                "mean": round(sum(self.claimed) / len(self.claimed), 2),
                "empty": sum(1 for n in self.claimed if n == 0),
            }
        return out


def _local(methods: Methods, service_url: str | None, name: str) -> Callable[[Any], Any]:
    """Register the function as method ``name``, unless the stages go to the service."""
    if service_url:
        return lambda fn: fn
    return methods.register(name)


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
    methods = Methods()
    # Remote modes: no method registered here, the app's URL configured instead, so every stage
    # is a JSON-RPC call over HTTP to the service (what the executor does for an app of
    # `[apps]` with a URL).
    app_urls = {APP: service_url} if service_url else None

    @_local(methods, service_url, "noop")
    def noop(t0: float | None = None) -> None:
        if t0 is not None:
            reporter.latency(t0)
        reporter.final()

    @_local(methods, service_url, "step")
    def step(x: int) -> dict[str, int]:
        if x == common.PIPELINE_STAGES:  # x is 1, 2, 3 at stages 0, 1, 2
            reporter.final()
        return {"x": x + 1}

    pool = await postgres.create_pool(dsn, min_size=2, max_size=concurrency)
    store = postgres.PostgresEngineStore(pool)
    timer = _StoreTimer() if trace else None
    if timer is not None:
        for name in ("claim", "record_stages", "finish_tasks", "heartbeat", "register_executor"):
            timer.wrap(store, name)
    try:
        reporter.ready()
        started = time.perf_counter()
        cpu0 = time.process_time()
        async with Executor(
            store,
            apps=[APP],
            methods=methods,
            app_urls=app_urls,
            # BENCH_KAIJU_BATCH=N: remote stage calls go out as JSON-RPC batches of up to N
            # (what `[apps] bench = URL batch=N` does).
            app_batch={APP: int(os.environ["BENCH_KAIJU_BATCH"])}
            if service_url and os.environ.get("BENCH_KAIJU_BATCH")
            else None,
            dsn=dsn,
            concurrency=concurrency,
            # BENCH_KAIJU_PREFETCH=N: tasks claimed ahead of free slots (default: the executor's).
            **(
                {"prefetch": int(os.environ["BENCH_KAIJU_PREFETCH"])}
                if os.environ.get("BENCH_KAIJU_PREFETCH")
                else {}
            ),
        ):
            await stop.wait()
        if timer is not None:
            stats = timer.summary()
            stats["wall_s"] = round(time.perf_counter() - started, 3)
            stats["worker_cpu_s"] = round(time.process_time() - cpu0, 3)
            reporter.emit("STAT " + json.dumps(stats))
    finally:
        await pool.close()
