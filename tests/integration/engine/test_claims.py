"""Executors sharing a database: each run claimed once, handed back on stop, in priority order."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import asyncpg

from kaiju_tasks import Task, TaskCommand
from kaiju_tasks.executor import Executor
from kaiju_tasks.methods import Methods
from kaiju_tasks.testing import eventually
from tests.integration.engine.support import wait_for


async def test_two_executors_run_each_task_exactly_once(
    task_service, store, registry, clock, dsn, calls
):
    created = await task_service.create(
        [Task(commands=[TaskCommand(method="echo", params={"i": i})]) for i in range(300)]
    )
    async with (
        Executor(store, methods=registry, clock=clock, dsn=dsn, concurrency=10),
        Executor(store, methods=registry, clock=clock, dsn=dsn, concurrency=10),
    ):
        for task in created:
            await wait_for(store, task["id"], "FINISHED")
    assert sorted(kw["i"] for name, kw in calls if name == "echo") == list(range(300))


async def test_stop_hands_unfinished_tasks_back_and_manager_requeues_them(
    task_service, store, registry, clock, dsn, manager
):
    ex = Executor(
        store, methods=registry, clock=clock, dsn=dsn, shutdown_grace=timedelta(milliseconds=100)
    )
    await ex.start()
    task = await task_service.create(Task(commands=[TaskCommand(method="hang")]))
    await wait_for(store, task["id"], "EXECUTED")
    await ex.stop()
    row = await store.get_task(task["id"])
    assert row["status"] == "SUSPENDED"
    await manager.tick(clock.now())
    assert (await store.get_task(task["id"]))["status"] == "QUEUED"


async def test_liveness_checks_never_take_away_tasks_claimed_meanwhile(
    task_service, store, clock, dsn, caplog
):
    # Regression: a heartbeat-time status check used to revoke tasks claimed while it ran.
    methods = Methods()

    @methods.register("noop")
    async def noop():
        await asyncio.sleep(0.002)

    # Checks every 20 ms; a lease long enough that a slow beat under load is no lapse (a lapse
    # abandons the calls in flight, on purpose: see test_lease.py).
    async with Executor(
        store,
        methods=methods,
        clock=clock,
        dsn=dsn,
        heartbeat_interval=timedelta(milliseconds=20),
        lease=timedelta(seconds=30),
    ):
        await task_service.create(
            [Task(commands=[TaskCommand(method="noop")]) for _ in range(1500)], columns=["id"]
        )

        async def all_finished():
            page = await task_service.list(conditions={"status": "FINISHED"}, limit=1)
            return page["count"] == 1500

        # On a timeout, the assertion below shows which tasks did not finish.
        with contextlib.suppress(AssertionError):
            await eventually(all_finished, within=60)
    statuses = await task_service.list(conditions={"status": {"ne": "FINISHED"}}, limit=5)
    assert statuses["count"] == 0, statuses["data"]
    assert not [r for r in caplog.records if getattr(r, "event", "") == "orphans_handed_back"]


async def test_under_backlog_high_priority_tasks_start_before_older_low_ones(
    task_service, store, clock, dsn
):
    started = []
    methods = Methods()

    @methods.register("work")
    def work(name):
        started.append(name)

    low = [
        Task(commands=[TaskCommand(method="work", params={"name": f"low{i}"})], priority="LOW")
        for i in range(20)
    ]
    await task_service.create(low)
    clock.advance(1)
    high = [
        Task(commands=[TaskCommand(method="work", params={"name": f"high{i}"})], priority="HIGH")
        for i in range(5)
    ]
    created = await task_service.create(high)
    async with Executor(store, methods=methods, clock=clock, dsn=dsn, concurrency=1, prefetch=0):
        await wait_for(store, created[-1]["id"], "FINISHED")
        await eventually(lambda: len(started) == 25)
    assert sorted(started[:5]) == [f"high{i}" for i in range(5)]  # same queued_at: any order


# -- regressions from the concurrency review ------------------------------------------------------


async def test_a_hand_back_wakes_the_manager_in_the_same_statement(
    store, clock, dsn, pool, make_task
):
    await make_task(
        id="h",
        status="QUEUED",
        job_id="j",
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(minutes=5),
    )
    (claimed,) = await store.claim(["default"], "ex", limit=1, now=clock.now())
    heard: list[str] = []
    listener = await asyncpg.connect(dsn)
    await listener.add_listener("kaiju_tasks_manager", lambda *args: heard.append(args[3]))
    try:
        assert await store.suspend_executor_tasks("ex", ["not-a-claim"], now=clock.now()) == set()
        # Notifications arrive in commit order: once this marker is heard, a wake-up sent by
        # the hand-back above would have been heard before it.
        await pool.execute("SELECT pg_notify('kaiju_tasks_manager', 'test-marker')")
        await eventually(lambda: "test-marker" in heard, within=5, what="the marker")
        assert heard == ["test-marker"]  # nothing handed back: the manager is left alone
        handed = await store.suspend_executor_tasks("ex", [claimed["claim_id"]], now=clock.now())
        assert handed == {"h"}
        await eventually(lambda: len(heard) > 1, within=5, what="the manager's wake-up")
    finally:
        await listener.close()


async def test_a_write_of_an_earlier_claim_never_touches_a_newer_run(store, clock, make_task):
    await make_task(
        id="c",
        status="QUEUED",
        job_id="j",
        commands=[{"method": "a"}, {"method": "b"}],
        queued_at=clock.now(),
        exec_deadline=clock.now() + timedelta(minutes=5),
    )
    (first,) = await store.claim(["default"], "ex", limit=1, now=clock.now())
    await store.suspend_executor_tasks("ex", [first["claim_id"]], now=clock.now())
    await store.requeue_suspended(now=clock.now(), limit=10)
    (second,) = await store.claim(["default"], "ex", limit=1, now=clock.now())
    assert first["claim_id"] != second["claim_id"]
    stale = {"id": "c", "stage": 0, "result": "stale", "claim_id": first["claim_id"]}
    assert await store.record_stages("ex", [stale], now=clock.now()) == set()
    assert await store.suspend_executor_tasks("ex", [first["claim_id"]], now=clock.now()) == set()
    fresh = {**stale, "result": "fresh", "claim_id": second["claim_id"]}
    assert await store.record_stages("ex", [fresh], now=clock.now()) == {"c"}
    assert (await store.get_task("c"))["result"] == ["fresh"]


async def test_claims_take_tasks_of_one_priority_and_time_in_the_order_they_were_created(
    task_service, store, clock
):
    # One bulk create: one queued_at for all, so only the queue index's tie order decides: the
    # rows' place in the table, here fresh space, in the order given.
    ids = [f"t{i:03}" for i in range(300)][::-1]  # not in id order
    await task_service.create([Task(id=i, commands=[TaskCommand(method="m")]) for i in ids])
    await task_service.create(
        [Task(id=f"hi{i}", commands=[TaskCommand(method="m")], priority="HIGH") for i in range(3)]
    )
    taken = []
    while batch := await store.claim(["default"], "ex", limit=7, now=clock.now()):
        taken.append({row["id"] for row in batch})
    assert taken[0] == {"hi0", "hi1", "hi2", ids[0], ids[1], ids[2], ids[3]}
    rest = [ids[4:][i : i + 7] for i in range(0, len(ids) - 4, 7)]
    assert taken[1:] == [set(chunk) for chunk in rest]


async def test_an_executor_with_long_stages_leaves_the_queue_to_others(
    task_service, store, clock, dsn
):
    # Prefetch is an allowance, not a quota: an executor claims ahead only as many tasks as its
    # slots free during one claim. With stages far longer than a claim that is one or two, so a
    # second executor started later still finds most of the queue waiting for it.
    # The stages end only when the test lets them (no race against their length): the first
    # executor's first two calls are held for at least a second, so it has measured long
    # stages; then, with all its calls held again, the second executor starts.
    started: dict[str, list[int]] = {"a": [], "b": []}
    ran: dict[str, list[int]] = {"a": [], "b": []}
    permits = asyncio.Semaphore(0)  # one per call the test lets end

    def methods_for(name: str) -> Methods:
        methods = Methods()

        @methods.register("long")
        async def long(i):
            started[name].append(i)
            await permits.acquire()
            ran[name].append(i)

        return methods

    created = await task_service.create(
        [Task(commands=[TaskCommand(method="long", params={"i": i})]) for i in range(20)]
    )
    first = Executor(
        store, methods=methods_for("a"), clock=clock, dsn=dsn, concurrency=2, prefetch=40
    )
    async with first:
        await eventually(lambda: len(started["a"]) == 2, what="the first executor's first calls")
        await asyncio.sleep(1.0)  # a lower bound: these calls last at least a second
        permits.release()
        permits.release()
        # Its next calls start (the tasks it claimed ahead), and are held.
        await eventually(lambda: len(ran["a"]) == 2 and len(started["a"]) == 4)
        # Once the ended runs are recorded, it holds its two running calls and one or two
        # claimed ahead (three if its claims were slow): not the 18 its prefetch would allow.
        await eventually(lambda: first.active <= 2 + 3, what="the first executor to hold few")
        # Its two slots are held, so it claims no more: most of the queue is left to others.
        queued = "SELECT count(*) FROM tasks WHERE status = 'QUEUED'"
        assert await store.pool.fetchval(queued) >= 20 - 2 - (2 + 3)
        async with Executor(
            store, methods=methods_for("b"), clock=clock, dsn=dsn, concurrency=2, prefetch=40
        ):
            # The second executor finds tasks waiting while the first still holds its own.
            await eventually(lambda: len(started["b"]) == 2, what="the second executor's calls")
            assert len(ran["a"]) == 2
            for _ in range(20):
                permits.release()
            for task in created:
                await wait_for(store, task["id"], "FINISHED", within=60)
    assert sorted(ran["a"] + ran["b"]) == list(range(20))
    assert len(ran["b"]) >= 2, ran


async def test_tasks_claimed_ahead_behind_stages_that_got_slow_go_back_to_the_queue(
    task_service, store, clock, dsn
):
    # Fast stages first: the executor measures calls of microseconds and claims hundreds of
    # tasks ahead of its two slots. Then the stages stall (the test holds them): the tasks it
    # claimed ahead would wait behind them, their deadlines running. After a second of waiting
    # they go back to the queue (all but the one or two it would claim ahead at that pace),
    # once each (it does not claim them again), and a second executor runs them while the
    # first one's calls are still held. No manager runs: the hand-back queues them itself.
    gate = asyncio.Event()
    ran: dict[str, list[int]] = {"a": [], "b": []}

    def methods_for(name: str) -> Methods:
        methods = Methods()

        @methods.register("fast")
        def fast(i):
            ran[name].append(i)

        @methods.register("slow")
        async def slow(i):
            if name == "a":
                await gate.wait()
            ran[name].append(i)

        return methods

    fast = [
        Task(commands=[TaskCommand(method="fast", params={"i": i})], priority=1) for i in range(300)
    ]
    slow = [Task(commands=[TaskCommand(method="slow", params={"i": 1000 + i})]) for i in range(200)]
    await task_service.create(fast + slow, columns=["id"])
    held = (
        "SELECT count(*) FROM tasks WHERE status = 'EXECUTED' AND executor_id = $1"
        " AND commands->0->>'method' = 'slow'"
    )
    first = Executor(store, methods=methods_for("a"), clock=clock, dsn=dsn, concurrency=2)
    async with first:
        most = 0

        async def held_many_then_few() -> bool:
            nonlocal most
            count = await store.pool.fetchval(held, first.id)
            most = max(most, count)
            return most > 20 and count <= 2 + 2

        # It claimed many slow tasks ahead (more than 20: hundreds by its measure), then kept
        # only its two running calls and at most two claimed ahead.
        await eventually(held_many_then_few, within=30, what="tasks claimed ahead handed back")
        assert len(ran["a"]) == 300  # the fast ones; both slow calls are still held
        async with Executor(store, methods=methods_for("b"), clock=clock, dsn=dsn, concurrency=2):
            await eventually(
                lambda: len(ran["b"]) >= 200 - 4, within=60, what="the second executor's runs"
            )
            assert ran["a"] == list(range(300))  # the first executor's slow calls are held
            gate.set()
            await eventually(lambda: len(ran["a"]) + len(ran["b"]) == 500, within=60)
    assert sorted(ran["a"] + ran["b"]) == list(range(300)) + list(range(1000, 1200))
    finished = "SELECT count(*) FROM tasks WHERE status = 'FINISHED'"
    assert await store.pool.fetchval(finished) == 500
    released = (
        "SELECT task_id, count(*) AS n FROM events WHERE type = 'task-sent'"
        " AND data = '{\"released\": true}' GROUP BY task_id"
    )
    counts = [row["n"] for row in await store.pool.fetch(released)]
    assert len(counts) >= 200 - 4
    assert max(counts) == 1  # each handed back once: the first executor took none back


async def test_an_idle_executor_claims_once_per_notified_task(task_service, store, clock, dsn):
    # A claim that comes back short means the queue is empty: the executor then waits for the
    # next notification instead of claiming again as each run settles and ends.
    methods = Methods()
    done: list[int] = []

    @methods.register("noop")
    def noop(i):
        done.append(i)

    claims = 0
    claim = store.claim

    async def counted(*args, **kwargs):
        nonlocal claims
        claims += 1
        return await claim(*args, **kwargs)

    store.claim = counted
    async with Executor(
        store, methods=methods, clock=clock, dsn=dsn, poll_interval=timedelta(minutes=5)
    ):
        await eventually(lambda: claims >= 1, what="the first claim")
        for i in range(20):
            task = await task_service.create(
                Task(commands=[TaskCommand(method="noop", params={"i": i})])
            )
            await wait_for(store, task["id"], "FINISHED")
    assert done == list(range(20))
    # One claim at start and one per notification; a few more if notifications coalesce.
    assert claims <= 1 + 20 + 3, claims
