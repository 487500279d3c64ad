"""Cron parsing and validation: ``next_fire(expr, after) -> datetime``."""

from __future__ import annotations

from datetime import UTC, datetime

from croniter import croniter  # type: ignore[attr-defined,unused-ignore]

from kaiju_tasks import errors, templates


def validate(expr: str, field: str = "cron") -> str:
    """Return ``expr`` stripped if it is a valid cron expression, else raise ValidationError."""
    expr = expr.strip()
    if not expr:
        raise errors.ValidationError("cron expression is empty", field=field)
    try:
        valid = croniter.is_valid(expr)
    except Exception:  # noqa: BLE001 - croniter raises assorted errors on odd input
        valid = False
    if not valid:
        raise errors.ValidationError(
            f"invalid cron expression {templates.shown(expr)} (expected e.g. '*/5 * * * *')",
            field=field,
        )
    # croniter accepts dates that never come ("0 0 31 2 *"): it fails only when asked for one.
    try:
        next_fire(expr, _SOME_TIME)
    except errors.ValidationError as exc:
        raise errors.ValidationError(exc.message, field=field) from None
    return expr


_SOME_TIME = datetime(2001, 1, 1, tzinfo=UTC)


def next_fire(expr: str, after: datetime) -> datetime:
    """Return the first fire time of ``expr`` strictly after ``after`` (aware UTC in, aware out).

    Raises:
        errors.ValidationError: the expression names a date that never comes.
    """
    try:
        result = croniter(expr, after).get_next(datetime)
    except Exception:  # noqa: BLE001 - croniter raises assorted errors (CroniterBadDateError)
        raise errors.ValidationError(
            f"cron expression {templates.shown(expr)} never fires (no such date)"
        ) from None
    assert isinstance(result, datetime)
    return result
