"""kaiju_tasks.logs.Outage on a clock of the test's own: the loss of the database logged once,
then a one-line reminder at a growing interval, then one line when it is back, saying how long
it was gone (issue 12, defect 4)."""

from __future__ import annotations

import itertools
import logging

import pytest

from kaiju_tasks import logs


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self) -> list[str]:
        return [getattr(r, "event", "") for r in self.records]


@pytest.fixture
def lines() -> Lines:
    return Lines()


def _outage(lines: Lines, clock: Ticks, **kwargs: float) -> logs.Outage:
    logger = logging.getLogger("tests.outage_log")
    logger.handlers[:] = [lines]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logs.Outage(logger, "executor A", monotonic=clock, **kwargs)


def _fail_every_second_for(outage: logs.Outage, clock: Ticks, seconds: int) -> None:
    for _ in range(seconds):
        outage.failed(ConnectionRefusedError(111, "Connect call failed"))
        clock.now += 1.0


def test_the_loss_is_logged_once_then_reminders_at_a_doubling_interval(lines):
    clock = Ticks()
    outage = _outage(lines, clock)
    _fail_every_second_for(outage, clock, 200)  # a call a second for 200 s
    assert lines.events()[0] == "database_lost"
    assert lines.events().count("database_lost") == 1
    reminders = [r for r in lines.records if r.__dict__.get("event") == "database_still_lost"]
    # 10 s after the loss, then 20 s more, 40 s more, 80 s more: at 10, 30, 70 and 150 s.
    assert [r.getMessage().split(" after ")[1].split(" s ")[0] for r in reminders] == [
        "10",
        "30",
        "70",
        "150",
    ]
    assert "(11 failed calls)" in reminders[0].getMessage()
    assert len(lines.records) == 5  # not one line per failed call


def test_reminders_stop_growing_at_the_longest_interval(lines):
    clock = Ticks()
    outage = _outage(lines, clock, first_reminder=10.0, max_reminder=40.0)
    _fail_every_second_for(outage, clock, 200)
    seconds = [
        int(r.getMessage().split(" after ")[1].split(" s ")[0])
        for r in lines.records
        if r.__dict__.get("event") == "database_still_lost"
    ]
    gaps = [b - a for a, b in itertools.pairwise(seconds)]
    assert seconds[0] == 10
    assert gaps == [20, 40, 40, 40, 40]  # at 10, 30, 70, 110, 150 and 190 s


def test_no_line_carries_a_traceback_and_each_is_one_line(lines):
    clock = Ticks()
    outage = _outage(lines, clock)
    try:
        raise OSError("connection\nrefused\n  on many lines")
    except OSError as exc:
        for _ in range(30):
            outage.failed(exc)
            clock.now += 1.0
    outage.ok()
    assert lines.records
    for record in lines.records:
        assert record.exc_info is None
        assert "\n" not in record.getMessage()
        assert record.levelno == logging.WARNING
        assert record.__dict__["component"] == "executor A"


def test_back_says_once_how_long_the_database_was_gone(lines):
    clock = Ticks()
    outage = _outage(lines, clock)
    assert not outage.lost
    outage.ok()  # nothing was lost: nothing to say
    assert lines.records == []
    _fail_every_second_for(outage, clock, 45)
    assert outage.since == 1000.0  # lost at the first failure
    outage.ok()
    outage.ok()
    back = [r for r in lines.records if r.__dict__.get("event") == "database_back"]
    assert len(back) == 1
    assert back[0].getMessage() == "executor A: database back after 45.0 s"
    assert back[0].__dict__["seconds"] == pytest.approx(45.0)
    assert not outage.lost


def test_a_new_outage_starts_over_from_the_first_reminder(lines):
    clock = Ticks()
    outage = _outage(lines, clock)
    _fail_every_second_for(outage, clock, 100)  # reminders at 10, 30, 70 s
    outage.ok()
    lines.records.clear()
    _fail_every_second_for(outage, clock, 15)
    assert lines.events() == ["database_lost", "database_still_lost"]
    assert "after 10 s (11 failed calls)" in lines.records[1].getMessage()
