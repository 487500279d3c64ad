"""Cron parsing and validation: what a schedule accepts and when it fires next."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from kaiju_tasks import cron, errors


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_a_valid_expression_is_returned_without_surrounding_blanks():
    assert cron.validate("  */5 * * * *\n") == "*/5 * * * *"


def test_an_empty_expression_is_refused_naming_the_field():
    with pytest.raises(errors.ValidationError) as refused:
        cron.validate("   ", field="data.cron")
    assert refused.value.field == "data.cron"
    assert refused.value.message == "cron expression is empty"


@pytest.mark.parametrize("expr", ["every minute", "61 * * * *", "* * *", "*/0 * * * *"])
def test_an_invalid_expression_is_refused_quoting_it_with_an_example(expr):
    with pytest.raises(errors.ValidationError) as refused:
        cron.validate(expr)
    assert refused.value.field == "cron"
    assert expr in refused.value.message
    assert "'*/5 * * * *'" in refused.value.message  # shows what a valid one looks like


def test_an_expression_naming_a_date_that_never_comes_is_refused_naming_the_field():
    with pytest.raises(errors.ValidationError) as refused:
        cron.validate("0 0 31 2 *", field="3.cron")
    assert refused.value.field == "3.cron"
    assert "never fires" in refused.value.message


def test_next_fire_is_strictly_after_the_given_time():
    assert cron.next_fire("*/5 * * * *", at("2030-01-01T12:03:00")) == at("2030-01-01T12:05:00")
    # On a fire time exactly, the next one: a task that just ran is not due again.
    assert cron.next_fire("*/5 * * * *", at("2030-01-01T12:05:00")) == at("2030-01-01T12:10:00")


def test_next_fire_crosses_months_and_years():
    assert cron.next_fire("0 0 1 * *", at("2030-12-15T08:00:00")) == at("2031-01-01T00:00:00")
    assert cron.next_fire("0 9 29 2 *", at("2030-03-01T00:00:00")) == at("2032-02-29T09:00:00")


def test_a_sixth_field_counts_seconds():
    assert cron.next_fire("* * * * * */10", at("2030-01-01T00:00:01")) == at("2030-01-01T00:00:10")


def test_next_fire_returns_an_aware_time_for_the_same_instant_in_any_zone():
    paris = timezone(timedelta(hours=1))
    after = datetime(2030, 1, 1, 13, 3, tzinfo=paris)  # 12:03 UTC
    fired = cron.next_fire("*/5 * * * *", after)
    assert fired.tzinfo is not None
    assert fired - after == timedelta(minutes=2)


def test_next_fire_of_an_expression_that_never_fires_raises_a_validation_error():
    with pytest.raises(errors.ValidationError, match="never fires"):
        cron.next_fire("0 0 30 2 *", at("2030-01-01T00:00:00"))
