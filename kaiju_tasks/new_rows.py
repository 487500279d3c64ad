"""The rows of new tasks: validates what ``TaskService.create`` is given, one row per task.

A row is a tuple in the order of ``base.NEW_TASK_COLUMNS``, the shape the store's bulk insert
(COPY) sends. The rows are built while the store reads them, so a bulk create validates the next
tasks while the server inserts the first ones. Neither the clock nor the database is read:
``now`` is passed in, and the only ambient input is the running stage (``context.get()``), whose
children the new tasks become.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from kaiju_tasks import context, cron, errors, models
from kaiju_tasks.store import base

_QUEUED = models.TaskStatus.QUEUED.value
_IDLE = models.TaskStatus.IDLE.value


ID = base.NEW_TASK_COLUMNS.index("id")
"""Where a new row holds the task id."""
NEXT_TASK = base.NEW_TASK_COLUMNS.index("next_task")
"""Where a new row holds the task it chains to."""


_VALIDATE_CHUNK = 200
"""A bulk create validates this many tasks in one call, then hands their rows to the store.

Small chunks keep the server busy from the start: it inserts one while the next is validated.
"""


_UUID4_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def _fresh_uuid4s(block: int) -> Iterator[str]:
    """New random UUID4 strings, as ``str(uuid.uuid4())`` writes them, as many as asked for.

    They are made ``block`` at a time from one ``os.urandom`` call (the source ``uuid.uuid4``
    uses): a bulk create needs two per task, and ``uuid.uuid4()`` costs a system call and a
    ``UUID`` object each. Made as the tasks are validated, so the first rows leave sooner. The
    version nibble is set to 4 and the variant bits to 10, as RFC 9562 says.
    """
    variant = _UUID4_VARIANT
    while True:
        h = os.urandom(16 * block).hex()
        yield from [
            f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
            f"{variant[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
            for i in range(0, 32 * block, 32)
        ]


class NewRows:
    """Rows built while they are read (once), whose number is known up front."""

    def __init__(self, rows: Iterator[base.NewTask], count: int) -> None:
        self._rows = rows
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[base.NewTask]:
        return self._rows

    def __contains__(self, row: object) -> bool:
        raise TypeError("new rows are read once, in order")


def next_task_of(item: Any) -> Any:
    """The next_task an item to create names, before validation (None if it names none)."""
    if isinstance(item, Mapping):
        return item.get("next_task")
    return getattr(item, "next_task", None)


def build(items: Sequence[Any], many: bool, caller: models.Caller, now: datetime) -> NewRows:
    """The rows of ``items`` (a list of tasks when ``many``), validated as they are read.

    Errors name the item (``"3.commands"``) when ``many``. ``caller`` owns tasks that name no
    ``user_id``; unless it is the system, it may not set system-only fields.
    """
    return NewRows(_rows(items, many, caller, now), len(items))


def _rows(
    items: Sequence[Any], many: bool, caller: models.Caller, now: datetime
) -> Iterator[base.NewTask]:
    """Validate ``items`` and yield their rows (``base.NEW_TASK_COLUMNS``), one at a time.

    A task due at once (enabled, no cron) is QUEUED with a new job_id and its deadline;
    the others wait in IDLE for ``next_run``. This loop runs once per task of a bulk create,
    so it reads the model's fields straight into one tuple per task.
    """
    seen: set[str] = set()
    # Times go to the store in UTC: equal-looking local times may be different instants
    # (a repeated hour at a DST change), and the COPY encoding caches by value.
    now = now.astimezone(UTC)
    parent = context.get()
    fresh = _fresh_uuid4s(min(2 * len(items), 2 * _VALIDATE_CHUNK))  # id and job_id
    deadlines: dict[int, datetime] = {}  # by max_exec_timeout: most tasks share a few
    system = caller.is_system
    tasks: Iterable[models.Task] = itertools.chain.from_iterable(
        models.parse_tasks(items[start : start + _VALIDATE_CHUNK], start if many else None)
        for start in range(0, len(items), _VALIDATE_CHUNK)
    )
    for i, task in enumerate(tasks):
        if not system:
            _check_system_fields(task, caller, f"{i}." if many else "")
        task_id = task.id or next(fresh)
        if task_id in seen:
            where = f"{i}." if many else ""
            raise errors.ValidationError(f"duplicate id {task_id!r}", field=f"{where}id")
        seen.add(task_id)
        if parent is not None and task.parent_id is None:
            # Created from inside a running stage: a child in that task's tree, with the
            # root's priority (as in Karton, a different priority asked for is ignored).
            parent_id, root_id = parent["task_id"], parent["root_id"]
            priority = parent["priority"]
        else:
            parent_id, root_id, priority = (
                task.parent_id,
                task.root_id or task_id,
                task.priority,
            )
        timeout = task.max_exec_timeout
        if task.enabled and task.cron is None:
            status, job_id, queued_at, next_run = _QUEUED, next(fresh), now, None
            deadline = deadlines.get(timeout)
            if deadline is None:
                deadline = deadlines[timeout] = now + timedelta(seconds=timeout)
        else:
            status, job_id, queued_at, deadline = _IDLE, None, None, None
            next_run = cron.next_fire(task.cron, now) if task.cron else now
        commands = task.commands
        user_id = task.user_id
        expires_at = task.expires_at
        if expires_at is not None:
            try:
                expires_at = expires_at.astimezone(UTC)
            except OverflowError:
                where = f"{i}." if many else ""
                raise errors.ValidationError(
                    "out of range once in UTC", field=f"{where}expires_at"
                ) from None
        yield (
            task_id,
            task.app_name,
            list(map(vars, commands)),  # each command's fields (to_json without a copy)
            task.kws,
            task.enabled,
            task.cron,
            timeout,
            task.max_retries,
            task.restart_policy._value_,  # the member's own value: no property call
            task.retry_delay,
            task.next_task,
            task.notify,
            task.system,
            task.description,
            task.meta,
            priority,
            status,
            len(commands),
            job_id,
            user_id if user_id is not None else caller.user_id,
            now,
            queued_at,
            deadline,
            next_run,
            now,
            expires_at,
            parent_id,
            root_id,
        )


def _check_system_fields(task: models.Task, caller: models.Caller, where: str) -> None:
    """Refuse fields only a system caller may set (``caller`` is not the system)."""
    if task.system:
        raise errors.ValidationError("only a system caller may set it", field=f"{where}system")
    if task.user_id is not None and task.user_id != caller.user_id:
        raise errors.ValidationError(
            "only a system caller may create tasks for another user", field=f"{where}user_id"
        )
    for name in ("parent_id", "root_id"):
        if getattr(task, name) is not None:
            raise errors.ValidationError("only a system caller may set it", field=f"{where}{name}")
