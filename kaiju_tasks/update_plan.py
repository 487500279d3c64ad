"""The rules of ``tasks.update`` as pure functions: what an update writes, and from which statuses.

:func:`parse` validates the changes a caller asks for; :func:`plan` turns them and the task's
current row into an :class:`UpdatePlan`: the columns to write (the engine's own included, such
as ``next_run``, ``stage`` or ``exec_deadline``) and the statuses the guarded statement may
change the row from. Neither reads the clock or the database: ``TaskService.update`` fetches the
row, passes ``now``, checks that ``next_task`` exists and applies the plan through the store,
whose statement re-checks the status under the row lock.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from kaiju_tasks import cron, errors, models

_Status = models.TaskStatus

ALL_BUT_RUNNING = tuple(s.value for s in _Status if s is not _Status.EXECUTED)
"""The statuses an update may change a task from: any but a running one."""

COMMANDS_EDITABLE = (
    _Status.IDLE.value,
    _Status.FINISHED.value,
    _Status.FAILED.value,
    _Status.QUEUED.value,
)
"""The statuses in which ``commands`` may change (QUEUED only before the first stage runs: the
store checks that part)."""

_ENDED_OR_IDLE = frozenset({_Status.IDLE, _Status.FINISHED, _Status.FAILED})
_DEADLINE_RUNS = frozenset({_Status.QUEUED, _Status.WAITING, _Status.SUSPENDED})
"""Statuses in which a run is under way (its ``exec_deadline`` counts from ``queued_at``)."""

_REFUSED = "task {id!r} is {status}: it cannot be changed now"
_REFUSED_COMMANDS = " (commands change only before the first stage runs or after the end)"


@dataclasses.dataclass(frozen=True, slots=True)
class UpdatePlan:
    """What one update writes and the statuses it may write from."""

    changes: dict[str, Any]
    """The columns to set, by name (the store's ``update_task`` takes them as they are)."""
    allowed_statuses: tuple[str, ...]
    """The row must hold one of these statuses when the statement runs."""
    commands_statuses: tuple[str, ...] | None
    """When ``commands`` change, the statuses in which they may; None when they do not."""
    refusal: str
    """Why nothing changed when the status guard refused: a message with ``{id!r}`` and
    ``{status}`` to fill in."""

    @property
    def next_task(self) -> str | None:
        """The task this update chains to, which must exist and be the caller's to start."""
        value: str | None = self.changes.get("next_task")
        return value


def parse(data: models.TaskUpdate | Mapping[str, Any], caller: models.Caller) -> models.TaskUpdate:
    """Validate the changes ``caller`` asks for, before the task is read.

    Refuses an empty update and the system-only fields a non-system caller sets (``user_id``
    excepted: :func:`plan` refuses it only when it differs from the current owner).
    """
    update = models.parse_update(data)
    fields = update.model_fields_set
    if not fields:
        raise errors.ValidationError("no fields to change", field="data")
    if not caller.is_system:
        for name in fields & models.SYSTEM_ONLY_FIELDS:
            if name != "user_id":
                raise errors.ValidationError(
                    "only a system caller may set it", field=f"data.{name}"
                )
    return update


def plan(
    current: Mapping[str, Any],
    update: models.TaskUpdate,
    *,
    caller: models.Caller,
    now: datetime,
) -> UpdatePlan:
    """Plan ``update`` (from :func:`parse`) of the task whose row is ``current``, at ``now``.

    The caller is already known to be allowed to change the task. Raises ValidationError
    naming the field (``data.<field>``) when the task would no longer hold together.
    """
    changes = _requested(current, update, caller)
    status = current["status"]
    allowed = ALL_BUT_RUNNING
    _schedule(current, changes, now)
    if changes.get("enabled") is False and status == _Status.QUEUED:
        # Disabling a queued task takes it off the queue; enabling queues it again. Guarded on
        # QUEUED alone: a task claimed or cancelled meanwhile must not be put back to IDLE.
        changes.update(status=_Status.IDLE.value, next_run=now, job_id=None)
        allowed = (_Status.QUEUED.value,)
    _deadline(current, changes)
    editing_commands = "commands" in changes
    return UpdatePlan(
        changes=changes,
        allowed_statuses=allowed,
        commands_statuses=COMMANDS_EDITABLE if editing_commands else None,
        refusal=_REFUSED + (_REFUSED_COMMANDS if editing_commands else ""),
    )


def _requested(
    current: Mapping[str, Any], update: models.TaskUpdate, caller: models.Caller
) -> dict[str, Any]:
    """The columns the caller asks to change, checked against the task as it is."""
    fields = update.model_fields_set
    if "user_id" in fields and not caller.is_system and update.user_id != current["user_id"]:
        # The owner is set on create; only a system caller may hand a task to another user
        # (modify_others lets a user change another's task, never take it over).
        raise errors.ValidationError(
            "the owner of a task is set on create; only a system caller may change it",
            field="data.user_id",
        )
    dumped = update.model_dump(mode="json", include=fields)
    changes: dict[str, Any] = {}
    for name in fields:
        if name == "commands":
            assert update.commands is not None
            changes["commands"] = [c.to_json() for c in update.commands]
            changes["stages"] = len(update.commands)
        elif name == "expires_at":
            changes[name] = update.expires_at  # a datetime for the store, not JSON text
        else:
            changes[name] = dumped[name]
    try:
        models.check_merged(current, changes)
    except errors.ValidationError as exc:
        raise errors.ValidationError(exc.message, field=f"data.{exc.field}") from None
    return changes


def _schedule(current: Mapping[str, Any], changes: dict[str, Any], now: datetime) -> None:
    """Add what a new schedule, new commands or enabling mean for a task that is not running."""
    status = current["status"]
    ended_or_idle = status in _ENDED_OR_IDLE
    if "cron" in changes and changes["cron"] != current["cron"] and ended_or_idle:
        # A new schedule fires next at its own time (an ended task restarts then); without
        # one an idle task waits for a reset or an update instead of running once at the
        # old fire time.
        changes["next_run"] = cron.next_fire(changes["cron"], now) if changes["cron"] else None
    if "commands" in changes and ended_or_idle:
        # New stages start from the first: old results belong to the old commands.
        changes.update(stage=0, result=[])
    if (
        changes.get("enabled") is True
        and status == _Status.IDLE
        and changes.get("next_run", current["next_run"]) is None
        and not changes.get("cron", current["cron"])
    ):
        changes["next_run"] = now  # enabling an idle task without a schedule runs it


def _deadline(current: Mapping[str, Any], changes: dict[str, Any]) -> None:
    """Move the deadline of a run under way when ``max_exec_timeout`` changes.

    The deadline counts from ``queued_at``, as it did when the run was queued.
    """
    if (
        "max_exec_timeout" in changes
        and current["queued_at"] is not None
        and current["status"] in _DEADLINE_RUNS
    ):
        changes["exec_deadline"] = current["queued_at"] + timedelta(
            seconds=changes["max_exec_timeout"]
        )
