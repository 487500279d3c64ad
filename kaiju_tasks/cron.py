"""Cron parsing and validation: ``next_fire(expr, after) -> datetime``."""

from __future__ import annotations

from datetime import datetime

from croniter import croniter  # type: ignore[attr-defined,unused-ignore]

from kaiju_tasks import errors


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
            f"invalid cron expression {expr!r} (expected e.g. '*/5 * * * *')", field=field
        )
    return expr


def next_fire(expr: str, after: datetime) -> datetime:
    """Return the first fire time of ``expr`` strictly after ``after`` (aware UTC in, aware out)."""
    result = croniter(expr, after).get_next(datetime)
    assert isinstance(result, datetime)
    return result
