"""kaiju_tasks_tasks_ended_total without a database: how EndedTotals adds up and labels runs."""

from __future__ import annotations

from typing import Any

from kaiju_tasks import insights, metrics


class FakeEnded:
    """Answers ``ended_counts`` from a script of (cursor, rows), recording the cursors asked."""

    def __init__(self, answers: list[tuple[Any, list[insights.EndedCount]]]) -> None:
        self.answers = answers
        self.asked: list[Any] = []

    async def ended_counts(self, cursor: Any) -> tuple[Any, list[insights.EndedCount]]:
        self.asked.append(cursor)
        return self.answers.pop(0)


def _row(app: str | None, status: str, count: int) -> insights.EndedCount:
    return {"app": app, "status": status, "count": count}


async def test_each_read_adds_what_ended_after_the_last_cursor() -> None:
    store = FakeEnded(
        [
            (("10", 5), [_row("shop", "FINISHED", 4), _row("shop", "FAILED", 1)]),
            (("10", 5), []),  # nothing written since: the same cursor comes back
            (("12", 9), [_row("shop", "FINISHED", 2), _row(None, "FAILED", 1)]),
        ]
    )
    reads = insights.Insights(store)  # type: ignore[arg-type]
    totals = metrics.EndedTotals()
    assert await totals.read(reads) == {("shop", "FINISHED"): 4, ("shop", "FAILED"): 1}
    assert await totals.read(reads) == {("shop", "FINISHED"): 4, ("shop", "FAILED"): 1}
    assert await totals.read(reads) == {
        ("shop", "FINISHED"): 6,
        ("shop", "FAILED"): 1,
        (metrics.OTHER, "FAILED"): 1,  # its task was deleted before it was counted
    }
    assert store.asked == [None, ("10", 5), ("10", 5)]


def test_app_labels_are_bounded_and_kept() -> None:
    totals = metrics.EndedTotals()
    totals.add([_row(f"app{i:03}", "FINISHED", 1) for i in range(metrics.MAX_APPS + 5)])
    assert len({app for app, _ in totals.totals}) == metrics.MAX_APPS + 1
    assert totals.totals[(metrics.OTHER, "FINISHED")] == 5
    totals.add([_row("app000", "FAILED", 2), _row("new", "FINISHED", 1)])
    assert totals.totals[("app000", "FAILED")] == 2  # a label once given stays
    assert totals.totals[(metrics.OTHER, "FINISHED")] == 6
    long = "x" * (metrics.LABEL_CHARS + 10)
    fresh = metrics.EndedTotals()
    fresh.add([_row(long, "FINISHED", 1)])
    assert [len(app) for app, _ in fresh.totals] == [metrics.LABEL_CHARS]
