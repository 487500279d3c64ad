"""The read side against PostgreSQL: the InsightsStore queries and the Insights service."""

from __future__ import annotations

from datetime import timedelta

from kaiju_tasks import insights
from kaiju_tasks.store import leadership, postgres


async def test_cluster_sees_the_leadership_lock_and_counts_live_executors(
    store: postgres.PostgresEngineStore, dsn: str, clock
) -> None:
    now = clock.now()
    await store.register_executor("prod", apps=["a"], host="h", pid=1, concurrency=1, now=now)
    await store.register_executor(
        "dbg", apps=["a@debug-x"], host="h", pid=2, concurrency=1, now=now, debug=True
    )
    await store.register_executor(
        "old", apps=["a"], host="h", pid=3, concurrency=1, now=now - timedelta(minutes=5)
    )
    await store.register_executor("gone", apps=["a"], host="h", pid=4, concurrency=1, now=now)
    await store.executor_stopped("gone", now=now)
    since = now - timedelta(minutes=1)
    cluster = await store.cluster(alive_since=since)
    assert (cluster["leader"], cluster["executors"], cluster["debug_executors"]) == (False, 2, 1)
    assert cluster["events"] >= 5  # worker-online four times, worker-offline once
    leader = leadership.AdvisoryLeadership(dsn)
    try:
        assert await leader.hold()
        assert (await store.cluster(alive_since=since))["leader"] is True
    finally:
        await leader.release()
    assert (await store.cluster(alive_since=since))["leader"] is False


async def test_counts_lag_and_queues_agree_with_the_tasks_table(
    store: postgres.PostgresEngineStore, make_task, clock
) -> None:
    for status in ("QUEUED", "QUEUED", "EXECUTED", "FINISHED"):
        await make_task(app_name="shop", status=status, queued_at=clock.now())
    await make_task(app_name="mail", status="WAITING")
    assert await store.task_counts() == [
        {"app": "mail", "status": "WAITING", "count": 1},
        {"app": "shop", "status": "EXECUTED", "count": 1},
        {"app": "shop", "status": "FINISHED", "count": 1},
        {"app": "shop", "status": "QUEUED", "count": 2},
    ]
    later = clock.now() + timedelta(seconds=30)
    assert await store.queue_lag(now=later) == [{"app": "shop", "lag": 30.0}]
    reads = insights.Insights(store)
    assert await reads.queues(later) == [
        {"app_name": "mail", "queued": 0, "running": 0, "waiting": 1, "lag": None},
        {"app_name": "shop", "queued": 2, "running": 1, "waiting": 0, "lag": 30.0},
    ]
    assert await reads.status_counts() == {"EXECUTED": 1, "FINISHED": 1, "QUEUED": 2, "WAITING": 1}


async def test_top_lists_executors_with_their_running_tasks_and_the_counts(
    store: postgres.PostgresEngineStore, make_task, clock
) -> None:
    now = clock.now()
    for name in ("b-exec", "a-exec"):
        await store.register_executor(name, apps=["shop"], host="h", pid=1, concurrency=2, now=now)
    await make_task(id="run-1", app_name="shop", status="EXECUTED", executor_id="a-exec")
    await make_task(id="wait-1", app_name="shop", status="WAITING")
    await make_task(id="done-1", app_name="shop", status="FINISHED")
    top = await store.top(heard_since=now - timedelta(minutes=10), limit=10)
    assert [(w["id"], w["running"]) for w in top["workers"]] == [
        ("a-exec", ["run-1"]),
        ("b-exec", []),
    ]
    assert sorted(t["id"] for t in top["tasks"]) == ["run-1", "wait-1"]
    assert {(c["status"], c["count"]) for c in top["counts"]} == {
        ("EXECUTED", 1),
        ("WAITING", 1),
        ("FINISHED", 1),
    }
    workers = await store.workers(heard_since=now - timedelta(minutes=10), limit=1)
    assert len(workers) == 1
