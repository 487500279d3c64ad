"""/metrics says whether a manager leads the database, and counts retries by method."""

from __future__ import annotations

from kaiju_tasks.metrics import Metrics
from kaiju_tasks.store import postgres


async def test_the_leader_gauge_follows_the_leadership_lock(
    store: postgres.PostgresEngineStore, dsn: str
) -> None:
    metrics = Metrics(store, dsn)
    assert "kaiju_tasks_leader 0.0" in (await metrics.render()).decode()
    leader = postgres.AdvisoryLeadership(dsn)
    try:
        assert await leader.hold()
        assert "kaiju_tasks_leader 1.0" in (await metrics.render()).decode()
    finally:
        await leader.release()
    assert "kaiju_tasks_leader 0.0" in (await metrics.render()).decode()


async def test_retries_are_counted_by_the_method_that_failed(
    store: postgres.PostgresEngineStore, dsn: str
) -> None:
    metrics = Metrics(store, dsn)
    for method in ("shop.charge", "shop.charge", "shop.ship"):
        metrics.event({"type": "task-retried", "data": {"method": method, "retries": 1}})
    metrics.event({"type": "task-failed", "data": {"method": "shop.ship"}})  # not a retry
    scrape = (await metrics.render()).decode()
    assert 'kaiju_tasks_task_retries_total{method="shop.charge"} 2.0' in scrape
    assert 'kaiju_tasks_task_retries_total{method="shop.ship"} 1.0' in scrape
