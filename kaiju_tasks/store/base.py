"""TaskStore Protocol: the only persistence seam.

Services, the manager and executors depend on this protocol; ``postgres.PostgresTaskStore`` is the
implementation. Rows are plain dicts of columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

Row = dict[str, Any]

NEW_TASK_COLUMNS = (
    "id", "app_name", "commands", "kws", "enabled", "cron", "max_exec_timeout", "max_retries",
    "restart_policy", "retry_delay", "next_task", "notify", "system", "description", "meta",
    "priority", "status", "stages", "job_id", "user_id", "created", "queued_at", "exec_deadline",
    "next_run", "status_change", "expires_at", "parent_id", "root_id",
)  # fmt: skip
"""A new task row, as ``TaskService`` builds it and :meth:`TaskStore.insert_tasks` takes it: a
tuple of these columns in this order. The engine's other columns start at their defaults."""

NewTask = tuple[Any, ...]

TIME_COLUMNS = frozenset(
    {
        "created",
        "queued_at",
        "exec_deadline",
        "wait_deadline",
        "next_run",
        "status_change",
        "expires_at",
    }
)
"""The ``tasks`` columns holding a timestamp (``timestamptz``, in UTC as the store returns it)."""

NewTasks = Collection[NewTask]
"""New task rows: their number is known up front; they may be built while they are read, so
they are iterated once."""


@dataclasses.dataclass(frozen=True, slots=True)
class ListQuery:
    """A listing: user filters plus the caller's visibility."""

    conditions: Any = None
    sort: Any = None
    columns: Any = None
    offset: int = 0
    limit: int = 100
    count: bool = True
    view_all: bool = False
    user_id: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; ``count`` and ``pages`` are None when counting was skipped."""

    count: int | None
    offset: int
    page: int
    pages: int | None
    on_page: int
    data: list[Row]


class TaskStore(Protocol):
    """Persistence of tasks and notifications."""

    async def insert_tasks(
        self,
        rows: NewTasks,
        columns: Sequence[str] | None = None,
        *,
        trace: Mapping[str, str] | None = None,
    ) -> list[Row]:
        """Insert new task rows (tuples of :data:`NEW_TASK_COLUMNS`) in one transaction.

        Return them as stored, each a dict of ``columns`` (default: every column, in table
        order).
        """
        ...

    async def insert_full(self, row: Mapping[str, Any]) -> Row:
        """Insert a task row in any state, columns as given (for tests and repairs)."""
        ...

    async def get_task(self, task_id: str) -> Row | None:
        """Return one task row, or None."""
        ...

    async def task_owners(self, ids: Sequence[str]) -> dict[str, str | None]:
        """Return ``{id: user_id}`` for those of ``ids`` that exist."""
        ...

    async def list_tasks(self, query: ListQuery) -> Page:
        """Return one page of tasks."""
        ...

    async def update_task(
        self,
        task_id: str,
        changes: Mapping[str, Any],
        *,
        modify_all: bool,
        user_id: str | None,
        allowed_statuses: Sequence[str] | None,
        commands_statuses: Sequence[str] | None,
    ) -> Row | None:
        """Apply ``changes`` if the caller may and the status allows; else None."""
        ...

    async def delete_task(self, task_id: str, *, modify_all: bool, user_id: str | None) -> bool:
        """Delete a task the caller may change."""
        ...

    async def reset_task(
        self, task_id: str, *, job_id: str, now: datetime, modify_all: bool, user_id: str | None
    ) -> Row | None:
        """Reset a task that is not running and queue it."""
        ...

    async def write_message(
        self,
        task_id: str,
        data: Any,
        *,
        now: datetime,
        modify_all: bool,
        user_id: str | None,
        results_left: int,
    ) -> Row | None:
        """Deliver a message to a task waiting on a Message stage.

        Only if the task's stored results take at most ``results_left`` bytes of JSON.
        """
        ...

    async def cancel_task(
        self,
        task_id: str,
        error: Mapping[str, Any],
        *,
        now: datetime,
        modify_all: bool,
        user_id: str | None,
    ) -> Row | None:
        """Abort a task that has not ended."""
        ...

    async def insert_notification(self, row: Mapping[str, Any]) -> Row:
        """Record a run of a task."""
        ...

    async def insert_token(
        self,
        token_hash: str,
        *,
        user_id: str,
        permissions: Sequence[str],
        name: str | None,
        now: datetime,
    ) -> Row:
        """Store a token's hash and grants."""
        ...

    async def find_token(self, token_hash: str) -> Row | None:
        """Return the grants of an active token."""
        ...

    async def list_tokens(self) -> list[Row]:
        """Return every token without its hash."""
        ...

    async def revoke_token(self, token_id: int, *, now: datetime) -> Row | None:
        """Revoke an active token."""
        ...

    async def get_notification(
        self, notification_id: int, *, view_all: bool, user_id: str | None
    ) -> Row | None:
        """Return a notification the caller may see."""
        ...

    async def list_notifications(self, query: ListQuery) -> Page:
        """Return one page of notifications."""
        ...

    async def update_notification(
        self, notification_id: int, read: bool, *, modify_all: bool, user_id: str | None
    ) -> Row | None:
        """Mark a notification read or unread."""
        ...

    async def delete_notification(
        self, notification_id: int, *, modify_all: bool, user_id: str | None
    ) -> bool:
        """Delete a notification the caller may change."""
        ...


class EngineStore(TaskStore, Protocol):
    """The transitions the manager and executors make; each is one guarded statement.

    Batch methods take items of several tasks and return which applied: an item whose task
    changed meanwhile (cancelled, timed out, rescued by the manager) is skipped, never forced.
    """

    async def register_executor(
        self,
        executor_id: str,
        *,
        apps: Sequence[str],
        host: str,
        pid: int,
        concurrency: int,
        now: datetime,
        debug: bool = False,
    ) -> None:
        """Record an executor coming online."""
        ...

    async def unserved_apps(
        self, *, now: datetime, alive_since: datetime, limit: int | None
    ) -> list[Row]:
        """Apps with QUEUED tasks that no live executor serves, the longest waiting first.

        Each row is ``{app, queued, waiting_s}``; a live executor is one heard from after
        ``alive_since`` that has not stopped.
        """
        ...

    async def heartbeat(self, executor_id: str, *, active: int, now: datetime) -> bool:
        """Record that an executor is alive."""
        ...

    async def executor_stopped(self, executor_id: str, *, now: datetime) -> None:
        """Record an executor going offline."""
        ...

    async def claim(
        self, apps: Sequence[str], executor_id: str, *, limit: int, now: datetime
    ) -> list[Row]:
        """Claim QUEUED tasks of ``apps``, highest priority then oldest first."""
        ...

    async def record_stages(
        self, executor_id: str, items: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> set[str]:
        """Commit intermediate stage results ``[{id, stage, result}]``."""
        ...

    async def finish_tasks(
        self, executor_id: str, items: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> set[str]:
        """Finish tasks ``[{id, stage, result, append, next_run}]``."""
        ...

    async def fail_tasks(self, items: Sequence[Mapping[str, Any]], *, now: datetime) -> list[Row]:
        """Fail or retry tasks ``[{id, status, executor_id, stage, error, exit_code, ...}]``."""
        ...

    async def requeue_rejected(
        self, executor_id: str, items: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> set[str]:
        """Put rejected tasks back in the queue ``[{id, stage, error}]``."""
        ...

    async def wait_tasks(
        self, executor_id: str, items: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> set[str]:
        """Park tasks on Timer/Message stages ``[{id, stage, wait_deadline}]``."""
        ...

    async def suspend_executor_tasks(
        self, executor_id: str, claim_ids: Sequence[str], *, now: datetime
    ) -> set[str]:
        """Hand back the runs (claim ids) an executor holds, and wake the manager."""
        ...

    async def task_status(self, ids: Sequence[str]) -> dict[str, Row]:
        """Return status, stage and executor of tasks."""
        ...

    async def orphans(self, executor_id: str, running: Sequence[str]) -> list[str]:
        """Return the claim ids ``executor_id`` holds but does not run (``running``)."""
        ...

    async def queue_due(self, *, now: datetime, limit: int) -> int:
        """Queue due IDLE tasks and ended cron tasks."""
        ...

    async def release_timers(self, *, now: datetime, limit: int) -> int:
        """Resume tasks whose Timer is due."""
        ...

    async def overdue(self, *, now: datetime, limit: int) -> list[Row]:
        """Return tasks past a deadline."""
        ...

    async def suspend_stale(
        self, *, now: datetime, silent_since: datetime | None, limit: int
    ) -> int:
        """Suspend tasks of silent or offline executors."""
        ...

    async def requeue_suspended(self, *, now: datetime, limit: int) -> int:
        """Queue SUSPENDED tasks again."""
        ...

    async def debug_orphans(
        self, *, silent_since: datetime | None, limit: int, apps: Sequence[str] | None = None
    ) -> list[Row]:
        """Tasks waiting in debug queues whose executor is gone."""
        ...

    async def prune(self, what: str, *, before: datetime, limit: int) -> int:
        """Delete old rows of ``what``."""
        ...

    async def notify_cancel(self, runs: Sequence[str]) -> None:
        """Tell executors to abandon these runs (``"task_id claim_id"``)."""
        ...


class Leadership(Protocol):
    """One leader per database among the managers."""

    async def hold(self) -> bool:
        """Take or keep the leadership; return whether this process holds it."""
        ...

    async def release(self) -> None:
        """Give the leadership up."""
        ...

    def fenced(self, store: EngineStore) -> EngineStore:
        """The store the leader's duties use: one that acts only while the leadership holds.

        An implementation that cannot fence returns ``store``.
        """
        ...
