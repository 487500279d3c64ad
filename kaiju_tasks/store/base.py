"""The persistence seams: TaskStore, EngineStore, InsightsStore, SessionStore, Leadership.

Services, the manager and executors depend on these protocols; ``postgres.PostgresTaskStore`` and
``postgres.PostgresEngineStore`` implement them (the read side's queries in ``insights.py``, the
leadership lock in ``leadership.py``). Rows are dicts of columns; those the engine and the
monitors read are typed below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, TypedDict

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


# -- typed rows ---------------------------------------------------------------------------------


class TaskRow(TypedDict):
    """A whole ``tasks`` row: what ``get_task`` and ``claim`` return (see ``store/tables.py``)."""

    id: str
    app_name: str
    commands: list[dict[str, Any]]
    kws: dict[str, Any]
    enabled: bool
    cron: str | None
    max_exec_timeout: int
    max_retries: int
    retries: int
    restart_policy: str
    retry_delay: int
    next_task: str | None
    notify: bool
    system: bool
    description: str | None
    meta: dict[str, Any]
    priority: int
    status: str
    stage: int
    stages: int
    result: list[Any]
    error: Any
    exit_code: int | None
    job_id: str | None
    user_id: str | None
    executor_id: str | None
    created: datetime
    queued_at: datetime | None
    exec_deadline: datetime | None
    wait_deadline: datetime | None
    next_run: datetime | None
    status_change: datetime
    expires_at: datetime | None
    parent_id: str | None
    root_id: str | None
    requeues: int
    claim_id: str | None
    trace: dict[str, str] | None


class FailedRow(TypedDict):
    """A failure :meth:`EngineStore.fail_tasks` applied: the task's new status, the run's ids."""

    id: str
    status: str
    executor_id: str | None
    claim_id: str | None


class TaskStatusRow(TypedDict):
    """Where a task is now (:meth:`EngineStore.task_status`)."""

    id: str
    status: str
    stage: int
    executor_id: str | None
    claim_id: str | None


class OverdueRow(TypedDict):
    """A task past a deadline (:meth:`EngineStore.overdue`).

    ``expired``: its ``expires_at`` passed before it started; ``run_expired``: its run's
    ``exec_deadline`` passed (else a Message stage's wait deadline did).
    """

    id: str
    status: str
    executor_id: str | None
    stage: int
    cron: str | None
    max_exec_timeout: int
    expires_at: datetime | None
    retry_delay: int
    retries: int
    expired: bool
    run_expired: bool | None


class DebugOrphanRow(TypedDict):
    """A task in a debug queue no live debug executor serves (:meth:`EngineStore.debug_orphans`)."""

    id: str
    status: str
    executor_id: str | None
    stage: int
    app_name: str


class UnservedApp(TypedDict):
    """An app with QUEUED tasks that no live executor serves; ``waiting_s``: the oldest's age."""

    app: str
    queued: int
    waiting_s: float


class ExecutorRow(TypedDict):
    """An ``executors`` row with the ids of the tasks it runs now (oldest claim first)."""

    id: str
    host: str
    pid: int
    apps: list[str]
    concurrency: int
    started: datetime
    heartbeat_at: datetime
    stopped_at: datetime | None
    debug: bool
    running: list[str]


class TaskCount(TypedDict):
    """How many tasks of an app are in a status."""

    app: str
    status: str
    count: int


class QueueLag(TypedDict):
    """The age of an app's oldest QUEUED task, in seconds (negative if queued after ``now``)."""

    app: str
    lag: float


class Cluster(TypedDict):
    """Whether a manager leads, how many executors (debug ones among them) live, events written.

    ``events``: the last event id ever given out, which never goes back when old events are
    pruned.
    """

    leader: bool
    executors: int
    debug_executors: int
    events: int


class ActiveTask(TypedDict):
    """A task running or waiting, as ``kaiju-tasks top`` lists it."""

    id: str
    app_name: str
    status: str
    stage: int
    stages: int
    executor_id: str | None
    job_id: str | None
    status_change: datetime
    wait_deadline: datetime | None


class TopSnapshot(TypedDict):
    """What ``kaiju-tasks top`` shows, read in one snapshot of the database."""

    workers: list[ExecutorRow]
    tasks: list[ActiveTask]
    counts: list[TaskCount]


class MinuteCount(TypedDict):
    """Tasks that finished and that failed (revoked and rejected included) in one minute."""

    minute: datetime
    finished: int
    failed: int


class EventRow(TypedDict, total=False):
    """A lifecycle event; ``events_after`` adds ``xid``, ``app_name`` and ``stages``."""

    id: int
    xid: str
    type: str
    task_id: str | None
    job_id: str | None
    status: str | None
    stage: int | None
    executor_id: str | None
    created: datetime
    data: Any
    app_name: str | None
    stages: int | None


EventCursor = tuple[str, int]
"""Where an event receiver stands: the transaction id (as text) and id of the last event read."""


class EndedCount(TypedDict):
    """Task runs of an app that ended in a status (FINISHED or FAILED).

    ``app`` is None for a task deleted since.
    """

    app: str | None
    status: str
    count: int


class RawTask(TypedDict):
    """A task's facts and its JSON columns as stored text, each cut to a length."""

    id: str
    app_name: str
    status: str
    stage: int
    stages: int
    user_id: str | None
    created: datetime
    status_change: datetime
    commands: str
    commands_chars: int
    kws: str
    kws_chars: int
    result: str
    result_chars: int
    error: str | None
    error_chars: int | None


class SessionRow(TypedDict):
    """The caller a dashboard session stands for."""

    token_id: int
    user_id: str
    permissions: list[str]


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
        lease: timedelta | None = None,
    ) -> None:
        """Record an executor coming online, with the lease it keeps to (None: none)."""
        ...

    async def unserved_apps(
        self, *, now: datetime, alive_since: datetime, limit: int | None
    ) -> list[UnservedApp]:
        """Apps with QUEUED tasks that no live executor serves (see :class:`InsightsStore`)."""
        ...

    async def heartbeat(self, executor_id: str, *, active: int, now: datetime) -> bool:
        """Record that an executor is alive."""
        ...

    async def executor_stopped(self, executor_id: str, *, now: datetime) -> None:
        """Record an executor going offline."""
        ...

    async def claim(
        self, apps: Sequence[str], executor_id: str, *, limit: int, now: datetime
    ) -> list[TaskRow]:
        """Claim QUEUED tasks of ``apps``, highest priority then oldest first.

        Each row is a whole task (the columns of :class:`TaskRow`).
        """
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

    async def fail_tasks(
        self, items: Sequence[Mapping[str, Any]], *, now: datetime
    ) -> list[FailedRow]:
        """Fail or retry tasks ``[{id, status, executor_id, stage, error, exit_code, ...}]``.

        Return those that applied, each a :class:`FailedRow`.
        """
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

    async def release_tasks(
        self, executor_id: str, claim_ids: Sequence[str], *, now: datetime
    ) -> set[str]:
        """Queue again the runs (claim ids) claimed ahead whose stage has not started."""
        ...

    async def task_status(self, ids: Sequence[str]) -> dict[str, TaskStatusRow]:
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

    async def overdue(self, *, now: datetime, limit: int) -> list[OverdueRow]:
        """Return tasks past a deadline, each an :class:`OverdueRow`."""
        ...

    async def suspend_stale(
        self,
        *,
        now: datetime,
        silent_since: datetime | None,
        limit: int,
        observed_since: datetime | None = None,
    ) -> int:
        """Suspend tasks of silent (past ``silent_since`` and their lease) or offline executors."""
        ...

    async def requeue_suspended(self, *, now: datetime, limit: int) -> int:
        """Queue SUSPENDED tasks again."""
        ...

    async def debug_orphans(
        self, *, silent_since: datetime | None, limit: int, apps: Sequence[str] | None = None
    ) -> list[DebugOrphanRow]:
        """Tasks waiting in debug queues whose executor is gone."""
        ...

    async def prune(self, what: str, *, before: datetime, limit: int) -> int:
        """Delete old rows of ``what``."""
        ...

    async def notify_cancel(self, runs: Sequence[str]) -> None:
        """Tell executors to abandon these runs (``"task_id claim_id"``)."""
        ...


class InsightsStore(Protocol):
    """The monitoring reads: what the dashboard, /metrics, /health, top and receivers show.

    Each is one named query; :class:`kaiju_tasks.insights.Insights` combines them.
    """

    async def task_counts(self) -> list[TaskCount]:
        """Tasks by app and status, ordered by app then status."""
        ...

    async def queue_lag(self, *, now: datetime) -> list[QueueLag]:
        """Per app with QUEUED tasks, the age at ``now`` of the oldest, ordered by app."""
        ...

    async def cluster(self, *, alive_since: datetime) -> Cluster:
        """Leader, live executors (heard from after ``alive_since``, not stopped), events."""
        ...

    async def workers(self, *, heard_since: datetime, limit: int | None) -> list[ExecutorRow]:
        """Executors heard from (or stopped) since ``heard_since``, live then newest first."""
        ...

    async def active_tasks(self, *, limit: int) -> list[ActiveTask]:
        """Tasks running or waiting, the longest in their status first."""
        ...

    async def top(self, *, heard_since: datetime, limit: int) -> TopSnapshot:
        """:meth:`workers` (by id), :meth:`active_tasks` and :meth:`task_counts`, one snapshot."""
        ...

    async def throughput(self, *, now: datetime, minutes: int) -> list[MinuteCount]:
        """Per minute of the ``minutes`` up to ``now`` that saw any: tasks finished and failed."""
        ...

    async def timeline(self, task_id: str, *, since: datetime, limit: int) -> list[EventRow]:
        """The newest ``limit`` events of a task written since ``since``, oldest first."""
        ...

    async def raw_task(self, task_id: str, *, chars: int) -> RawTask | None:
        """A task's facts and its JSON columns as stored text (each cut to ``chars``)."""
        ...

    async def unserved_apps(
        self, *, now: datetime, alive_since: datetime, limit: int | None
    ) -> list[UnservedApp]:
        """Apps with QUEUED tasks that no live executor serves, the longest waiting first.

        A live executor is one heard from after ``alive_since`` that has not stopped; debug
        queues are left out (the manager empties those whose executor is gone).
        """
        ...

    async def served_apps(self, *, alive_since: datetime) -> set[str]:
        """The apps live executors serve."""
        ...

    async def ended_counts(
        self, cursor: EventCursor | None
    ) -> tuple[EventCursor | None, list[EndedCount]]:
        """Task runs ended after ``cursor`` (None: every kept event), and the cursor after them.

        By app and status, the most first; the cursor comes back as given when no event was
        written since.
        """
        ...

    async def events_after(
        self, cursor: EventCursor | None, *, limit: int, snapshot: bool = False
    ) -> list[EventRow]:
        """Events after ``cursor`` (None: from the oldest kept), none missed, none repeated.

        ``snapshot=True`` reads every committed event, for a one-off replay that is not
        followed afterwards.
        """
        ...

    async def event_cursor(self, event_id: int | None) -> EventCursor | None:
        """The cursor after event ``event_id``, or after the newest event when None."""
        ...


class SessionStore(Protocol):
    """Dashboard sessions, stored by the SHA-256 of their id."""

    async def start_session(
        self,
        id_hash: str,
        token_hash: str,
        *,
        now: datetime,
        expires: datetime,
        keep: int,
        lifetime: timedelta,
    ) -> bool:
        """Start a session for an active token; False if the token is unknown or revoked.

        Also ends the token's sessions beyond its newest ``keep``, and every ended session
        (expired, older than ``lifetime``, or of a revoked token).
        """
        ...

    async def find_session(
        self, id_hash: str, *, now: datetime, idle: timedelta, lifetime: timedelta, touch: timedelta
    ) -> SessionRow | None:
        """The caller a live session stands for at ``now``.

        A session used after more than ``touch`` of quiet is extended to ``now + idle``.
        """
        ...

    async def end_session(self, id_hash: str) -> None:
        """End a session."""
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
