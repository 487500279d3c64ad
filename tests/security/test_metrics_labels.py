"""/metrics stays small and free of user data, however many apps and methods tasks name.

Tasks whose method is a template such as ``[!f:leak-{kws.email}-{!x:uuid4}]`` once gave the
unauthenticated scrape one label per rendered method, e-mails included (5,000 tasks: 12 KB to
10 MB). Methods are labelled as written, at most ``MAX_METHODS`` of them plus ``other``; apps at
most ``MAX_APPS`` plus ``other``; a label value is at most ``LABEL_CHARS`` characters.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import generate_latest

from kaiju_tasks import Task, TaskCommand
from kaiju_tasks.executor import Executor
from kaiju_tasks.methods import Methods
from kaiju_tasks.metrics import LABEL_CHARS, MAX_APPS, MAX_METHODS, OTHER, Metrics, top_apps
from kaiju_tasks.testing import eventually

pytestmark = pytest.mark.timeout(240)

LEAK = "[!f:leak-{kws.email}-{!x:uuid4}]"
SCRAPE_BYTES = 1024 * 1024


def _values(text: str, metric: str, label: str) -> dict[str, float]:
    """``label`` value -> sample of every line of ``metric`` (one label per series)."""
    found: dict[str, float] = {}
    pattern = re.compile(rf'^{metric}\{{(?:[^}}]*,)?{label}="((?:[^"\\]|\\.)*)"[^}}]*\}} (\S+)$')
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            found[match.group(1)] = found.get(match.group(1), 0.0) + float(match.group(2))
    return found


@pytest.fixture
async def metrics(store: Any, dsn: str, clock: Any) -> AsyncIterator[Metrics]:
    metrics = Metrics(store, dsn, clock)
    await metrics.start()
    try:
        yield metrics
    finally:
        await metrics.stop()


async def test_thousands_of_methods_run_leave_a_bounded_scrape_without_user_data(
    task_service, store, clock, dsn, metrics
):
    registry = Methods()
    registry.add("known", lambda: "ok")
    leaking = [
        Task(app="default", commands=[TaskCommand(method=LEAK)], kws={"email": f"u{i}@mail.test"})
        for i in range(1000)
    ]
    distinct = [Task(commands=[TaskCommand(method=f"method-{i}")]) for i in range(1000)]
    known = [Task(commands=[TaskCommand(method="known")]) for _ in range(10)]
    total = len(leaking) + len(distinct) + len(known)
    await task_service.create([*known, *leaking, *distinct])

    async def observed() -> str | None:
        text = (await metrics.render()).decode()
        counts = _values(text, "kaiju_tasks_stage_duration_seconds_count", "method")
        return text if sum(counts.values()) >= total else None

    async with Executor(store, methods=registry, clock=clock, dsn=dsn, concurrency=20):
        text = await eventually(observed, within=180, what="every stage observed")
    counts = _values(text, "kaiju_tasks_stage_duration_seconds_count", "method")
    assert len(text.encode()) < SCRAPE_BYTES
    assert len(counts) <= MAX_METHODS + 1
    assert counts[OTHER] > 0
    assert counts["known"] == 10  # seen first: keeps its own label
    assert counts[LEAK] == 1000  # the template as written, one label for all its renderings
    assert sum(counts.values()) == total
    assert "mail.test" not in text
    assert "leak-u" not in text


async def test_thousands_of_apps_are_summed_beyond_the_busiest(task_service, metrics, clock):
    busy = [
        Task(app=f"busy-{i}", commands=[TaskCommand(method="m")])
        for i in range(5)
        for _ in range(3)
    ]
    lone = [Task(app=f"app-{i}", commands=[TaskCommand(method="m")]) for i in range(5000)]
    await task_service.create(busy)
    clock.advance(60)  # the busy apps' tasks are the oldest QUEUED: a lag of 60 s
    for start in range(0, len(lone), 2500):
        await task_service.create(lone[start : start + 2500])
    text = (await metrics.render()).decode()
    tasks = _values(text, "kaiju_tasks_tasks", "app")
    lag = _values(text, "kaiju_tasks_queue_lag_seconds", "app")
    assert len(text.encode()) < SCRAPE_BYTES
    assert len(tasks) == MAX_APPS + 1
    assert len(lag) == MAX_APPS + 1
    assert all(tasks[f"busy-{i}"] == 3 for i in range(5))  # the busiest keep their label
    assert sum(tasks.values()) == len(busy) + len(lone)  # nothing lost: the rest is "other"
    assert tasks[OTHER] == len(lone) - (MAX_APPS - 5)
    assert lag[OTHER] == 0.0  # the other apps' oldest task was queued just now
    assert all(lag[f"busy-{i}"] == 60.0 for i in range(5))


def test_method_labels_are_capped_in_number_and_length(store, dsn):
    metrics = Metrics(store, dsn)
    for i in range(5000):  # distinct methods of the longest length a task accepts
        event = {
            "type": "task-failed",
            "data": {"method": f"{i:05d}" + "m" * 507, "duration_s": 0.1},
        }
        metrics.event(event)
    metrics.event({"type": "task-succeeded", "data": {"method": None, "duration_s": 0.1}})
    metrics.event({"type": "task-succeeded", "data": {"method": OTHER, "duration_s": 0.1}})
    text = generate_latest(metrics.registry).decode()
    counts = _values(text, "kaiju_tasks_stage_duration_seconds_count", "method")
    assert len(text.encode()) < SCRAPE_BYTES
    assert len(counts) == MAX_METHODS + 1
    assert all(len(value) <= LABEL_CHARS for value in counts)
    assert counts[OTHER] == 5000 - MAX_METHODS + 2  # the rest, the skipped stage, "other"
    assert len(set(counts)) == len(counts)  # cut values stay distinct (a digest of the whole)


def test_top_apps_ranks_by_task_count_and_folds_an_app_named_other():
    rows = [
        {"app": "b", "count": 5},
        {"app": "a", "count": 5},
        {"app": "c", "count": 1},
        {"app": OTHER, "count": 9},
        {"app": "a", "count": 1},
    ]
    assert top_apps(rows, limit=1) == {"a": "a", "b": OTHER, "c": OTHER, OTHER: OTHER}
    assert top_apps(rows, limit=2) == {"a": "a", "b": "b", "c": OTHER, OTHER: OTHER}
