"""TaskService and NotificationService: what applications and the RPC server call.

Every method validates its input, applies the caller's permissions and returns plain JSON-ready
dicts of columns (timestamps as ISO 8601 strings), the same shape the RPC returns. In-process calls
run as the system caller unless ``caller=`` says otherwise.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from kaiju_tasks import (
    _gc,
    errors,
    limits,
    models,
    new_rows,
    stages,
    task_error,
    tracing,
    update_plan,
    wire,
)
from kaiju_tasks import clock as clock_
from kaiju_tasks.rpc import protocol
from kaiju_tasks.store import base

# Kept for existing imports (``from kaiju_tasks.service import TokenService``): the class lives
# in kaiju_tasks.tokens.
from kaiju_tasks.tokens import TokenService as TokenService

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_BULK = 10000
"""At most this many tasks in one ``create`` call."""

_GC_PAUSE_MIN = 256
"""From this many tasks on, ``create`` pauses the cyclic garbage collector over its loops (the
store pauses it over a bulk write, see ``PostgresTaskStore.insert_tasks``)."""


def _columns(columns: Any, known: Sequence[str], field: str = "columns") -> list[str] | None:
    if columns is None or columns == "*":
        return None
    if isinstance(columns, str):
        columns = [columns]
    if not isinstance(columns, list | tuple) or not columns:
        raise errors.ValidationError("columns is a non-empty list of column names", field=field)
    for i, name in enumerate(columns):
        if name not in known:
            raise errors.ValidationError(
                f"unknown column {name!r}; known: {', '.join(known)}", field=f"{field}.{i}"
            )
    return list(columns)


MAX_OFFSET = 2**53


def _paging(offset: Any, limit: Any) -> tuple[int, int]:
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= MAX_OFFSET:
        raise errors.ValidationError(f"offset is an integer from 0 to {MAX_OFFSET}", field="offset")
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise errors.ValidationError("limit is an integer >= 1", field="limit")
    return offset, min(limit, MAX_LIMIT)


def _id(value: Any, field: str = "id") -> str:
    if not isinstance(value, str) or not value or len(value) > models.MAX_ID_LENGTH:
        raise errors.ValidationError(
            f"a task id is a non-empty string of at most {models.MAX_ID_LENGTH} characters",
            field=field,
        )
    return value


class _Access:
    """What a caller may do with rows owned by ``user_id``."""

    def __init__(self, caller: models.Caller) -> None:
        self.caller = caller
        self.view_all = caller.views_all
        # Changing rows one cannot see would reveal them: modify-others needs view-others.
        self.modify_all = caller.modifies_all and caller.views_all
        self.user_id = caller.user_id

    def sees(self, row: Mapping[str, Any]) -> bool:
        return self.view_all or (self.user_id is not None and row.get("user_id") == self.user_id)

    def modifies(self, row: Mapping[str, Any]) -> bool:
        return self.modify_all or (self.user_id is not None and row.get("user_id") == self.user_id)


class TaskService:
    """Create, read, change and control tasks (``service_name`` "tasks")."""

    service_name = "tasks"

    def __init__(self, store: base.TaskStore, clock: clock_.Clock | None = None) -> None:
        self.store = store
        self.clock: clock_.Clock = clock or clock_.SystemClock()

    # -- create -------------------------------------------------------------------------------

    async def create(
        self,
        data: models.Task | Mapping[str, Any] | Sequence[models.Task | Mapping[str, Any]],
        *,
        columns: Any = None,
        caller: models.Caller = models.SYSTEM,
    ) -> dict[str, Any] | builtins.list[dict[str, Any]]:
        """Create one task, or many in one transaction when ``data`` is a list.

        A task that is enabled and has no ``cron`` is queued at once (status QUEUED, a new
        ``job_id``); a cron task waits in IDLE for its first fire time; a disabled one waits in
        IDLE until enabled. A task created while a stage runs (in that stage's method) becomes
        a child of the running task: ``parent_id`` is that task, ``root_id`` its root, and it
        takes the root's priority. Returns the created task(s) as dicts of ``columns``.
        """
        many = isinstance(data, Sequence) and not isinstance(data, str | bytes | Mapping)
        items: Sequence[Any] = data if many else [data]  # type: ignore[assignment]
        if not isinstance(items, list | tuple):
            items = builtins.list(items)  # validated in slices
        if many and not items:
            raise errors.ValidationError("no tasks given", field="data")
        if len(items) > MAX_BULK:
            raise errors.ValidationError(f"at most {MAX_BULK} tasks per call", field="data")
        selected = _columns(columns, models.TASK_COLUMNS)
        created = await self._insert(items, many, caller, selected)
        if selected is not None and base.TIME_COLUMNS.isdisjoint(selected):
            out = created  # fresh dicts with no timestamp to write as text
        else:
            with _gc.paused(len(created) >= _GC_PAUSE_MIN):
                out = [wire.json_ready(row) for row in created]
        return out if many else out[0]

    async def _insert(
        self,
        items: Sequence[Any],
        many: bool,
        caller: models.Caller,
        selected: builtins.list[str] | None,
    ) -> builtins.list[base.Row]:
        rows: base.NewTasks = new_rows.build(items, many, caller, self.clock.now())
        if any(new_rows.next_task_of(item) is not None for item in items):
            # A chained task must exist and be the caller's to start: build every row first.
            with _gc.paused(len(items) >= _GC_PAUSE_MIN):
                rows = builtins.list(rows)
            ids = {row[new_rows.ID] for row in rows}
            refs = {
                f"{f'{i}.' if many else ''}next_task": row[new_rows.NEXT_TASK]
                for i, row in enumerate(rows)
                if row[new_rows.NEXT_TASK] is not None and row[new_rows.NEXT_TASK] not in ids
            }
            await self._check_next_tasks(refs, _Access(caller))
        # Otherwise the rows are validated and built while the store sends them.
        return await self.store.insert_tasks(rows, selected, trace=tracing.carrier())

    async def _check_next_tasks(self, refs: Mapping[str, str], access: _Access) -> None:
        """Check that every referenced next_task exists and the caller may start it."""
        if not refs:
            return
        owners = await self.store.task_owners(builtins.list(set(refs.values())))
        for field, task_id in refs.items():
            if task_id not in owners or not access.modifies({"user_id": owners[task_id]}):
                raise errors.ValidationError(f"task {task_id!r} does not exist", field=field)

    # -- read ---------------------------------------------------------------------------------

    async def get(
        self, id: str, columns: Any = None, *, caller: models.Caller = models.SYSTEM
    ) -> dict[str, Any]:
        """Return a task as a dict of ``columns`` (default: all); raise TaskNotFound."""
        selected = _columns(columns, models.TASK_COLUMNS)
        row = await self._visible(_id(id), _Access(caller))
        return wire.json_ready(row, selected)

    async def exists(self, id: str, *, caller: models.Caller = models.SYSTEM) -> bool:
        """Return whether a task the caller may see exists."""
        row = await self.store.get_task(_id(id))
        return row is not None and _Access(caller).sees(row)

    async def list(
        self,
        conditions: Any = None,
        sort: Any = None,
        offset: int = 0,
        limit: int = DEFAULT_LIMIT,
        count: bool = True,
        columns: Any = None,
        *,
        caller: models.Caller = models.SYSTEM,
    ) -> dict[str, Any]:
        """Return a page of tasks: ``{count, offset, page, pages, on_page, data}``.

        ``conditions``: a dict is AND over columns, a list of dicts is OR; a column's value is a
        scalar (equality), a list (IN) or ``{op: value}`` with ops ``eq ne gt lt ge le like in
        not``. ``sort``: column names or ``{"desc": name}``. ``limit`` is capped at 1000;
        ``count=False`` skips counting (``count`` and ``pages`` are then None).
        """
        return await _list(
            self.store.list_tasks, caller, conditions, sort, offset, limit, count, columns
        )

    async def _visible(self, task_id: str, access: _Access) -> dict[str, Any]:
        row = await self.store.get_task(task_id)
        if row is None or not access.sees(row):
            raise errors.TaskNotFound(f"task {task_id!r} not found")
        return row

    async def _explain(self, task_id: str, access: _Access, why: str) -> errors.KaijuTasksError:
        """Say why a guarded statement changed nothing: not found, not allowed, or ``why``."""
        try:
            row = await self._visible(task_id, access)
        except errors.TaskNotFound as exc:
            return exc
        if not access.modifies(row):
            return errors.NotAuthorized(f"not allowed to change task {task_id!r}")
        return errors.InvalidTransition(why.format(status=row["status"], id=task_id))

    # -- change -------------------------------------------------------------------------------

    async def update(
        self,
        id: str,
        data: models.TaskUpdate | Mapping[str, Any],
        *,
        columns: Any = None,
        caller: models.Caller = models.SYSTEM,
    ) -> dict[str, Any]:
        """Change the fields a user may change; refused while the task is running.

        ``commands`` may change only while the task is IDLE, FINISHED, FAILED, or QUEUED before
        its first stage. Returns the updated task.
        """
        task_id = _id(id)
        selected = _columns(columns, models.TASK_COLUMNS)
        update = update_plan.parse(data, caller)
        access = _Access(caller)
        current = await self._visible(task_id, access)
        if not access.modifies(current):
            raise errors.NotAuthorized(f"not allowed to change task {task_id!r}")
        planned = update_plan.plan(current, update, caller=caller, now=self.clock.now())
        if planned.next_task is not None:
            await self._check_next_tasks({"data.next_task": planned.next_task}, access)
        row = await self.store.update_task(
            task_id,
            planned.changes,
            modify_all=access.modify_all,
            user_id=access.user_id,
            allowed_statuses=planned.allowed_statuses,
            commands_statuses=planned.commands_statuses,
        )
        if row is None:
            raise await self._explain(task_id, access, planned.refusal)
        return wire.json_ready(row, selected)

    async def delete(self, id: str, *, caller: models.Caller = models.SYSTEM) -> None:
        """Delete a task that is not running (tasks chaining to it stop chaining)."""
        task_id = _id(id)
        access = _Access(caller)
        deleted = await self.store.delete_task(
            task_id, modify_all=access.modify_all, user_id=access.user_id
        )
        if not deleted:
            raise await self._explain(
                task_id, access, "task {id!r} is running ({status}): cancel it before deleting"
            )

    async def copy(
        self,
        id: str,
        app_name: str | None = None,
        *,
        app: str | None = None,
        columns: Any = None,
        caller: models.Caller = models.SYSTEM,
    ) -> dict[str, Any]:
        """Create a new task that runs what task ``id`` runs, for ``app_name`` (default: its own).

        ``app`` is accepted for ``app_name``, as in ``create``.

        The copy has a new id and job id and is queued at once at stage 0 with the original's
        stages, ``kws``, timeouts, retries, priority, ``notify``, ``description`` and ``meta``;
        it has no ``cron``, ``next_task`` or ``expires_at``, so it runs once and starts nothing
        else. Its ``meta.copy_of`` names the original. The usual use is routing a production
        task to a debug executor's private queue (``<app>@debug-<random>``) to run it against
        code under development. The caller must be allowed to see the original.
        """
        if app is not None:
            if app_name is not None and app_name != app:
                raise errors.ValidationError("give app_name or app, not both", field="app")
            app_name = app
        row = await self._visible(_id(id), _Access(caller))
        data: dict[str, Any] = {
            name: row[name]
            for name in (
                "commands",
                "kws",
                "max_exec_timeout",
                "max_retries",
                "restart_policy",
                "retry_delay",
                "notify",
                "description",
                "priority",
            )
        }
        data["app_name"] = row["app_name"] if app_name is None else app_name
        data["meta"] = {**(row["meta"] or {}), "copy_of": row["id"]}
        if caller.is_system and row["user_id"] is not None:
            data["user_id"] = row["user_id"]  # the owner keeps seeing the copy
        try:
            created = await self.create(data, columns=columns, caller=caller)
        except errors.ValidationError as exc:
            if exc.field in {"app_name", "app"}:
                raise
            raise errors.ValidationError(
                f"task {row['id']!r} cannot be copied: {exc.message}", field="id"
            ) from None
        assert isinstance(created, dict)
        return created

    async def reset(self, id: str, *, caller: models.Caller = models.SYSTEM) -> dict[str, Any]:
        """Return a task to its initial state and queue it again with a new ``job_id``.

        Results, error, exit code and retries are cleared. A disabled task goes to IDLE and is
        queued once enabled. A running task must be cancelled first.
        """
        task_id = _id(id)
        access = _Access(caller)
        row = await self.store.reset_task(
            task_id,
            job_id=str(uuid.uuid4()),
            now=self.clock.now(),
            modify_all=access.modify_all,
            user_id=access.user_id,
        )
        if row is None:
            raise await self._explain(
                task_id, access, "task {id!r} is running ({status}): cancel it before a reset"
            )
        return wire.json_ready(row)

    async def write_message(
        self, id: str, data: models.JSONValue = None, *, caller: models.Caller = models.SYSTEM
    ) -> dict[str, Any]:
        """Deliver ``data`` to a task waiting on a Message stage.

        ``data`` becomes that stage's result and the task is queued at the next stage. A task
        that is not waiting for a message refuses it with InvalidTransition.
        """
        task_id = _id(id)
        access = _Access(caller)
        bounds = limits.active()
        try:
            size = len(orjson.dumps(data)) + 1
        except TypeError as exc:
            raise errors.ValidationError(f"not JSON: {exc}", field="data") from None
        if size > bounds.stage_result_bytes:
            raise errors.ValidationError(
                f"the message is {size:,} bytes of JSON, more than stage_result_bytes"
                f" ({limits.describe(bounds.stage_result_bytes)})",
                field="data",
            )
        row = await self.store.write_message(
            task_id,
            data,
            now=self.clock.now(),
            modify_all=access.modify_all,
            user_id=access.user_id,
            results_left=bounds.task_result_bytes - size,
        )
        if row is None:
            current = await self._visible(task_id, access)
            commands, stage = current["commands"], current["stage"]
            waits_for_message = (
                current["status"] == models.TaskStatus.WAITING
                and stage < len(commands)
                and (kind := stages.kind_of(commands[stage])) is not None
                and kind.takes_message
            )
            if waits_for_message and access.modifies(current):
                # Waiting for a message, the caller's to answer: only the size can refuse it.
                raise errors.ValidationError(
                    "the task's results with this message would take more than"
                    f" task_result_bytes ({limits.describe(bounds.task_result_bytes)})",
                    field="data",
                )
            raise await self._explain(
                task_id, access, "task {id!r} is not waiting for a message (status {status})"
            )
        return wire.json_ready(row)

    async def cancel(self, id: str, *, caller: models.Caller = models.SYSTEM) -> dict[str, Any]:
        """Abort a task that has not ended: FAILED, exit code 130, no retry.

        A running stage is abandoned by its executor.
        """
        task_id = _id(id)
        access = _Access(caller)
        # The statement adds the stage the task stands at, under its row lock.
        error = task_error.build(protocol.CANCELLED, "Task cancelled", reason="cancelled")
        row = await self.store.cancel_task(
            task_id,
            error,
            now=self.clock.now(),
            modify_all=access.modify_all,
            user_id=access.user_id,
        )
        if row is None:
            raise await self._explain(task_id, access, "task {id!r} has already ended ({status})")
        return wire.json_ready(row)


class NotificationService:
    """Read and mark the notifications written when tasks with ``notify`` end.

    ``service_name`` "notifications".
    """

    service_name = "notifications"

    def __init__(self, store: base.TaskStore) -> None:
        self.store = store

    async def get(
        self, id: int, columns: Any = None, *, caller: models.Caller = models.SYSTEM
    ) -> dict[str, Any]:
        """Return one notification; raise NotificationNotFound."""
        selected = _columns(columns, models.NOTIFICATION_COLUMNS)
        access = _Access(caller)
        row = await self.store.get_notification(
            _notification_id(id), view_all=access.view_all, user_id=access.user_id
        )
        if row is None:
            raise errors.NotificationNotFound(f"notification {id!r} not found")
        return wire.json_ready(row, selected)

    async def list(
        self,
        conditions: Any = None,
        sort: Any = None,
        offset: int = 0,
        limit: int = DEFAULT_LIMIT,
        count: bool = True,
        columns: Any = None,
        *,
        caller: models.Caller = models.SYSTEM,
    ) -> dict[str, Any]:
        """Return a page of notifications, filtered like :meth:`TaskService.list`."""
        return await _list(
            self.store.list_notifications, caller, conditions, sort, offset, limit, count, columns
        )

    async def update(
        self, id: int, data: Mapping[str, Any], *, caller: models.Caller = models.SYSTEM
    ) -> dict[str, Any]:
        """Mark a notification read (``{"read": true}``) or unread."""
        notification_id = _notification_id(id)
        if not isinstance(data, Mapping):
            raise errors.ValidationError("changes are an object", field="data")
        unknown = set(data) - {"read"}
        if unknown:
            raise errors.ValidationError(
                "only 'read' can be changed", field=f"data.{sorted(unknown)[0]}"
            )
        if not isinstance(data.get("read"), bool):
            raise errors.ValidationError("read is true or false", field="data.read")
        access = _Access(caller)
        row = await self.store.update_notification(
            notification_id, data["read"], modify_all=access.modify_all, user_id=access.user_id
        )
        if row is None:
            await self._explain(notification_id, access)
        assert row is not None
        return wire.json_ready(row)

    async def delete(self, id: int, *, caller: models.Caller = models.SYSTEM) -> None:
        """Delete a notification."""
        notification_id = _notification_id(id)
        access = _Access(caller)
        deleted = await self.store.delete_notification(
            notification_id, modify_all=access.modify_all, user_id=access.user_id
        )
        if not deleted:
            await self._explain(notification_id, access)

    async def _explain(self, notification_id: int, access: _Access) -> None:
        row = await self.store.get_notification(
            notification_id, view_all=access.view_all, user_id=access.user_id
        )
        if row is None:
            raise errors.NotificationNotFound(f"notification {notification_id!r} not found")
        raise errors.NotAuthorized(f"not allowed to change notification {notification_id!r}")


def _notification_id(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**63:
        raise errors.ValidationError("a notification id is a positive integer", field="id")
    return value


async def _list(
    fetch: Any,
    caller: models.Caller,
    conditions: Any,
    sort: Any,
    offset: Any,
    limit: Any,
    count: Any,
    columns: Any,
) -> dict[str, Any]:
    offset, limit = _paging(offset, limit)
    if not isinstance(count, bool):
        raise errors.ValidationError("count is true or false", field="count")
    access = _Access(caller)
    page: base.Page = await fetch(
        base.ListQuery(
            conditions=conditions,
            sort=sort,
            columns=columns,
            offset=offset,
            limit=limit,
            count=count,
            view_all=access.view_all,
            user_id=access.user_id,
        )
    )
    return {
        "count": page.count,
        "offset": page.offset,
        "page": page.page,
        "pages": page.pages,
        "on_page": page.on_page,
        "data": [wire.json_ready(row) for row in page.data],
    }
