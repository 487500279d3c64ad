"""Executor leases: a cut-off executor starts no stage call its rescued tasks' new runs make.

The manager rescues a silent executor's tasks no earlier than the lease the executor recorded;
the executor, for its part, starts no call once most of its lease has passed without a
heartbeat the database took. Together: a run the manager rescued never calls its stage beside
the run that replaced it (only a call already in flight at the cut can be made twice).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from kaiju_tasks import Task, TaskCommand, context, errors
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager, steps
from kaiju_tasks.methods import Methods
from kaiju_tasks.store import driver, postgres
from kaiju_tasks.testing import eventually
from tests.integration.engine.support import wait_for
from tests.proxy import FreezableProxy


async def _claimed_by(store, executor_id: str, task_id: str, clock) -> None:
    rows = await store.claim(["default"], executor_id, limit=1, now=clock.now())
    assert [r["id"] for r in rows] == [task_id]


async def test_the_manager_waits_for_a_silent_executors_lease_to_end(task_service, store, clock):
    now = clock.now()
    await store.register_executor(
        "leased", apps=["default"], host="h", pid=1, concurrency=1, now=now,
        lease=timedelta(seconds=60),
    )  # fmt: skip
    await store.register_executor(
        "old", apps=["other"], host="h", pid=2, concurrency=1, now=now
    )  # an executor of an earlier version: no lease recorded
    leased = await task_service.create(Task(commands=[TaskCommand(method="m")]))
    await _claimed_by(store, "leased", leased["id"], clock)
    old = await task_service.create(Task(commands=[TaskCommand(method="m")], app_name="other"))
    rows = await store.claim(["other"], "old", limit=1, now=now)
    assert [r["id"] for r in rows] == [old["id"]]
    settings = steps.Settings(stale_after=timedelta(seconds=30))

    # Past stale_after but inside the lease: only the executor without a lease is lost.
    at = clock.advance(40)
    assert await steps.rescue_stale(store, at, settings) == 1
    assert (await store.get_task(leased["id"]))["status"] == "EXECUTED"
    assert (await store.get_task(old["id"]))["status"] == "SUSPENDED"

    # Past the lease too.
    at = clock.advance(21)
    assert await steps.rescue_stale(store, at, settings) == 1
    assert (await store.get_task(leased["id"]))["status"] == "SUSPENDED"


async def test_the_lease_counts_from_when_the_manager_began_watching(task_service, store, clock):
    start = clock.now()
    await store.register_executor(
        "leased", apps=["default"], host="h", pid=1, concurrency=1, now=start,
        lease=timedelta(seconds=60),
    )  # fmt: skip
    task = await task_service.create(Task(commands=[TaskCommand(method="m")]))
    await _claimed_by(store, "leased", task["id"], clock)
    settings = steps.Settings(stale_after=timedelta(seconds=30))
    watched_from = clock.advance(300)  # the manager got the database back only now
    at = clock.advance(45)  # watched for stale_after, not yet for the lease
    assert await steps.rescue_stale(store, at, settings, observed_since=watched_from) == 0
    at = clock.advance(16)
    assert await steps.rescue_stale(store, at, settings, observed_since=watched_from) == 1


async def test_a_heartbeat_in_progress_makes_the_rescue_pass_the_executor_by(
    task_service, store, clock, dsn
):
    # The rescue locks the rows of the executors it judges lost (FOR SHARE SKIP LOCKED): one
    # whose heartbeat is being written is passed by, not taken for lost on the heartbeat time
    # the rescue's snapshot saw; once the heartbeat commits, the executor is alive. (Without
    # the lock, the rescue would take its tasks while the executor, its heartbeat recorded,
    # renews its lease and calls them.)
    await store.register_executor(
        "late", apps=["default"], host="h", pid=1, concurrency=1, now=clock.now()
    )
    task = await task_service.create(Task(commands=[TaskCommand(method="m")]))
    await _claimed_by(store, "late", task["id"], clock)
    at = clock.advance(steps.DEFAULT_STALE_AFTER + timedelta(seconds=1))
    beat = await asyncpg.connect(dsn)
    try:
        async with beat.transaction():
            await beat.execute("UPDATE executors SET heartbeat_at = $1 WHERE id = 'late'", at)
            assert await asyncio.wait_for(steps.rescue_stale(store, at, steps.Settings()), 30) == 0
        assert await steps.rescue_stale(store, at, steps.Settings()) == 0  # and now it is alive
    finally:
        await beat.close()
    assert (await store.get_task(task["id"]))["status"] == "EXECUTED"


def test_a_lease_shorter_than_two_heartbeats_is_refused(store):
    with pytest.raises(errors.ConfigError, match="lease"):
        Executor(
            store,
            heartbeat_interval=timedelta(seconds=5),
            lease=timedelta(seconds=9),
        )
    default = Executor(store, heartbeat_interval=timedelta(seconds=2))
    assert default.lease == timedelta(seconds=6)


@pytest.fixture
async def cut_store(
    proxy_dsn,
) -> AsyncIterator[tuple[postgres.PostgresEngineStore, FreezableProxy]]:
    """An engine store whose connections pass through a proxy the test can freeze."""
    dsn, proxy = proxy_dsn
    pool = await driver.create_pool(dsn, min_size=1, max_size=4)
    try:
        yield postgres.PostgresEngineStore(pool), proxy
    finally:
        proxy.flowing.set()
        pool.terminate()


class Gated:
    """A method ``gated`` that records (executor, task) and returns once the gate opens."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.gate = asyncio.Event()
        self.methods = Methods()
        self.methods.register("gated")(self.gated)

    async def gated(self) -> str:
        current = context.current_task.get()
        assert current is not None
        self.calls.append((current["executor_id"], current["task_id"]))
        await self.gate.wait()
        return "done"

    def of(self, executor_id: str) -> list[str]:
        return [task for executor, task in self.calls if executor == executor_id]


async def _cut_off_while_calling(
    task_service, clock, cut_store, caplog, gated: Gated
) -> tuple[Executor, list[str], str]:
    """Start an executor over ``cut_store`` holding two tasks, one calling, then cut it off.

    Returns once its lease has lapsed and the second task, given the slot the first call freed,
    waits for a heartbeat; the first call has returned, its result unwritten.
    """
    caplog.set_level(logging.INFO, logger="kaiju_tasks")
    cut, proxy = cut_store
    tasks = [
        (await task_service.create(Task(id=f"t{i}", commands=[TaskCommand(method="gated")])))["id"]
        for i in range(2)
    ]
    cut_off = Executor(
        cut,
        executor_id="cut-off",
        methods=gated.methods,
        clock=clock,
        concurrency=1,
        prefetch=5,
        poll_interval=timedelta(milliseconds=50),
        heartbeat_interval=timedelta(milliseconds=200),
    )
    await cut_off.start()
    # One task calls (and holds the only slot); the other is claimed ahead.
    await eventually(lambda: len(gated.calls) == 1 and cut_off.active == 2, within=30)
    proxy.freeze()  # the executor's host is cut off from the database
    seen = len(caplog.records)
    await eventually(lambda: time.monotonic() > cut_off._lease_until, within=30)
    # The call in flight returns (its result cannot be written); its slot goes to the task
    # claimed ahead, which must wait for a heartbeat.
    gated.gate.set()
    await eventually(
        lambda: any(r.getMessage().startswith("Lease lapsed") for r in caplog.records[seen:]),
        within=30,
        interval=0.05,
    )
    return cut_off, tasks, gated.calls[0][1]


async def _rescue(store, clock) -> None:
    """The manager, which still reaches the database, rescues the silent executor's tasks."""
    clock.advance(steps.DEFAULT_STALE_AFTER + timedelta(seconds=1))
    done = await Manager(store, clock=clock).tick(clock.now())
    assert done["rescue_stale"] == 2
    assert done["requeue_suspended"] == 2


def _abandoned_calls(caplog) -> list[str]:
    """The executor's own count of the calls a lapse abandoned, one message per lapse."""
    return [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "calls_abandoned"]


async def _finished_after_the_heal(store, clock, task_ids: list[str]) -> None:
    """Wait for ``task_ids`` to finish after the heal, ticking the manager.

    The next heartbeat hands back the tasks the executor holds but no longer runs, the manager
    re-queues them, and they run again, to the end.
    """
    manager = Manager(store, clock=clock)

    async def finished() -> bool:
        await manager.tick(clock.now())
        rows = [await store.get_task(t) for t in task_ids]
        return all(row["status"] == "FINISHED" for row in rows)

    await eventually(finished, within=30, interval=0.1)


async def test_a_cut_off_executor_starts_no_call_of_a_task_the_manager_rescued(
    task_service, store, clock, cut_store, caplog
):
    gated = Gated()
    _, proxy = cut_store
    cut_off, tasks, first = await _cut_off_while_calling(
        task_service, clock, cut_store, caplog, gated
    )
    try:
        await _rescue(store, clock)
        async with Executor(
            store,
            executor_id="elsewhere",
            methods=gated.methods,
            clock=clock,
            poll_interval=timedelta(milliseconds=50),
        ):
            for task_id in tasks:
                await wait_for(store, task_id, "FINISHED", within=30)
    finally:
        # The network comes back: the cut-off executor learns its runs were taken and drops
        # them without calling.
        proxy.flowing.set()
    await eventually(lambda: cut_off.active == 0, within=30)
    await cut_off.stop()

    assert sorted(gated.of("elsewhere")) == sorted(tasks)
    assert gated.of("cut-off") == [first]
    for task_id in tasks:
        row = await store.get_task(task_id)
        assert (row["status"], row["result"]) == ("FINISHED", ["done"])


async def test_a_healed_executor_that_claims_its_rescued_tasks_again_calls_each_once_more(
    task_service, store, clock, cut_store, caplog
):
    # No other executor: once healed, the same executor claims the rescued tasks anew. The run
    # that waited for the lease is not the new run and must not call.
    gated = Gated()
    _, proxy = cut_store
    cut_off, tasks, first = await _cut_off_while_calling(
        task_service, clock, cut_store, caplog, gated
    )
    try:
        await _rescue(store, clock)
    finally:
        proxy.flowing.set()
    try:
        for task_id in tasks:
            await wait_for(store, task_id, "FINISHED", within=30)
    finally:
        await cut_off.stop()
    # The call in flight at the cut is made again by the new run; the waiting one only once.
    second = next(t for t in tasks if t != first)
    assert sorted(gated.of("cut-off")) == sorted([first, first, second])


async def test_a_lapsed_lease_abandons_the_call_in_flight_and_the_task_runs_again_once_healed(
    task_service, store, clock, cut_store, caplog
):
    # Once the lease is out the manager may rescue the run: its call must not go on beside the
    # new run's (an in-process method is cancelled; an HTTP call's connection is reset, so a
    # request still queued on a cut link never arrives).
    caplog.set_level(logging.INFO, logger="kaiju_tasks")
    cut, proxy = cut_store
    calls: list[str] = []
    cancelled = asyncio.Event()
    methods = Methods()

    @methods.register("slow")
    async def slow() -> str:
        calls.append("call")
        if len(calls) == 1:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return "done"

    task = await task_service.create(Task(commands=[TaskCommand(method="slow")]))
    lapsing = Executor(
        cut,
        executor_id="lapsing",
        methods=methods,
        clock=clock,
        concurrency=1,
        poll_interval=timedelta(milliseconds=50),
        heartbeat_interval=timedelta(milliseconds=200),
    )
    await lapsing.start()
    try:
        await eventually(lambda: len(calls) == 1, within=30)
        proxy.freeze()
        await asyncio.wait_for(cancelled.wait(), timeout=30)
        assert _abandoned_calls(caplog) == ["Lease lapsed: 1 stage calls in flight abandoned"]
        proxy.flowing.set()
        await _finished_after_the_heal(store, clock, [task["id"]])
    finally:
        proxy.flowing.set()
        await lapsing.stop()
    assert calls == ["call", "call"]
    assert (await store.get_task(task["id"]))["result"] == ["done"]


async def test_a_lapsed_lease_abandons_a_batch_request_in_flight(
    task_service, store, clock, cut_store, caplog, rpc_target
):
    # The same for calls sent in a batch: the batch request is abandoned (its connection
    # reset), its runs end unwritten, and once healed the tasks run again and finish.
    caplog.set_level(logging.INFO, logger="kaiju_tasks")
    cut, proxy = cut_store
    release = asyncio.Event()

    async def held(call: Any) -> Any:
        if len(service.calls) <= 2:  # the first batch (of two) waits for the test
            await release.wait()
        return "done"

    service = await rpc_target(held)
    tasks = [
        (await task_service.create(Task(app_name="shop", commands=[TaskCommand(method="m")])))["id"]
        for _ in range(2)
    ]
    lapsing = Executor(
        cut,
        apps=["shop"],
        app_urls={"shop": service.url},
        app_batch={"shop": 10},
        executor_id="lapsing",
        clock=clock,
        concurrency=1,
        poll_interval=timedelta(milliseconds=50),
        heartbeat_interval=timedelta(milliseconds=200),
    )
    await lapsing.start()
    try:
        await eventually(lambda: len(service.calls) == 2 and lapsing.active == 2, within=30)
        proxy.freeze()
        await eventually(lambda: lapsing.active == 0, within=30)  # both runs abandoned
        assert _abandoned_calls(caplog) == ["Lease lapsed: 2 stage calls in flight abandoned"]
        release.set()
        proxy.flowing.set()
        await _finished_after_the_heal(store, clock, tasks)
    finally:
        release.set()
        proxy.flowing.set()
        await lapsing.stop()
    for task_id in tasks:
        assert (await store.get_task(task_id))["result"] == ["done"]
