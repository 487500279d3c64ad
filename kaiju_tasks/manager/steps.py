"""The manager's duties: one coroutine each, ``(store, now, settings) -> count``.

Each duty is a guarded statement (or a read followed by guarded writes) and safe to run twice:
an item that changed meanwhile is skipped.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta
from typing import Any

from kaiju_tasks import cron, defaults, retry, task_error
from kaiju_tasks.rpc import protocol
from kaiju_tasks.store import base

logger = logging.getLogger(__name__)

DEFAULT_BATCH = defaults.MANAGER_BATCH
DEFAULT_STALE_AFTER = defaults.STALE_AFTER
DEFAULT_TASK_RETENTION = defaults.TASK_RETENTION
DEFAULT_NOTIFICATION_RETENTION = defaults.NOTIFICATION_RETENTION
DEFAULT_EVENT_RETENTION = defaults.EVENT_RETENTION
DEFAULT_EXECUTOR_RETENTION = defaults.EXECUTOR_RETENTION
GC_ROUNDS = 20
"""Most deletions of ``batch * 10`` rows per table in one garbage collection."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Tunables of the duties."""

    batch: int = DEFAULT_BATCH
    """Most rows one duty handles per tick."""
    stale_after: timedelta = DEFAULT_STALE_AFTER
    """An executor silent this long is lost; its tasks are suspended and re-queued."""
    task_retention: timedelta = DEFAULT_TASK_RETENTION
    """Ended non-cron, non-system tasks are deleted this long after they ended."""
    notification_retention: timedelta = DEFAULT_NOTIFICATION_RETENTION
    """Notifications are deleted this long after they were written."""
    event_retention: timedelta = DEFAULT_EVENT_RETENTION
    """Events are deleted this long after they were written."""
    executor_retention: timedelta = DEFAULT_EXECUTOR_RETENTION
    """Executors silent this long are forgotten."""


async def expire_timeouts(store: base.EngineStore, now: datetime, settings: Settings) -> int:
    """Fail (or retry) tasks past their run deadline or their Message wait deadline.

    A task not started by its ``expires_at`` is revoked without retry.

    Running stages of those tasks are told to stop (their executors abandon the call).
    """
    rows = await store.overdue(now=now, limit=settings.batch)
    if not rows:
        return 0
    # In id order, like every batch, so that no two batches can deadlock.
    items = sorted((_timeout_item(row, now) for row in rows), key=lambda item: item["id"])
    applied = await store.fail_tasks(items, now=now)
    running = [f"{r['id']} {r['claim_id'] or ''}" for r in applied if r["executor_id"] is not None]
    if running:
        await store.notify_cancel(running)
    return len(applied)


def _timeout_item(row: base.OverdueRow, now: datetime) -> dict[str, Any]:
    retryable = True
    reason = "timeout"
    due = "run" if row["run_expired"] else "wait"
    if row["expired"] and row["expires_at"] is not None:
        due = "expired"
        message = f"task expired at {row['expires_at'].isoformat()} before it started"
        retryable = False
        reason = "expired"
    elif row["run_expired"]:
        message = (
            f"task deadline exceeded: max_exec_timeout {row['max_exec_timeout']} s from queued_at"
        )
    else:
        message = "no message arrived before the Message stage's max_timeout"
    return {
        "id": row["id"],
        "status": row["status"],
        "executor_id": row["executor_id"],
        "stage": row["stage"],
        "error": task_error.build(protocol.TIMEOUT, message, stage=row["stage"], reason=reason),
        "exit_code": 130,
        "retryable": retryable,
        "due": due,
        "next_run": cron.next_fire(row["cron"], now).isoformat() if row["cron"] else None,
        "retry_at": retry.next_attempt_at(row["retry_delay"], row["retries"], now).isoformat(),
    }


async def rescue_stale(
    store: base.EngineStore,
    now: datetime,
    settings: Settings,
    *,
    observed_since: datetime | None = None,
) -> int:
    """Suspend the tasks of executors that stopped heartbeating or went offline.

    An executor is lost only after ``stale_after`` of silence the manager itself watched with
    the database reachable: silence is counted from the later of its last heartbeat and
    ``observed_since`` (when this manager last took the leadership or got the database back).
    Until the manager has watched that long, only executors that went offline (or whose row is
    gone) are rescued: after an outage every heartbeat looks old, and the executors that
    outlived it need a heartbeat interval to show they are alive. A silent executor that
    recorded a lease is lost only once that lease has run out as well (counted the same way):
    until then it may still start stage calls, and a rescue would run them twice.

    Args:
        store: the engine store.
        now: the current time.
        settings: the duties' tunables (``stale_after``, ``batch``).
        observed_since: when the manager's current, unbroken view of the database began
            (None: always watched, as in tests that call ``tick`` directly).
    """
    return await store.suspend_stale(
        now=now,
        silent_since=_silent_since(now, settings, observed_since),
        limit=settings.batch,
        observed_since=observed_since,
    )


def _silent_since(
    now: datetime, settings: Settings, observed_since: datetime | None
) -> datetime | None:
    """Heartbeats older than this are silence (None: the manager has not watched long enough)."""
    silent_since = now - settings.stale_after
    if observed_since is not None and observed_since > silent_since:
        return None  # not watched long enough: no executor is silent for stale_after
    return silent_since


DEBUG_GONE = "debug_executor_gone"
"""The ``reason`` of tasks failed because the debug executor of their queue is gone."""


async def fail_debug_orphans(
    store: base.EngineStore,
    now: datetime,
    settings: Settings,
    *,
    observed_since: datetime | None = None,
    apps: list[str] | None = None,
) -> int:
    """Fail the tasks left in the queues of debug executors that are gone.

    A debug queue (``<app>@debug-<random>``) is served by one debug executor only: once it has
    stopped, been silent for ``stale_after`` (counted as in ``rescue_stale``) or never existed,
    nothing will ever run its tasks. They fail at once (exit code 130, reason
    ``debug_executor_gone``) instead of waiting for their deadline. A debug executor that
    stops calls this for its own queues (``apps``).
    """
    rows = await store.debug_orphans(
        silent_since=_silent_since(now, settings, observed_since), limit=settings.batch, apps=apps
    )
    if not rows:
        return 0
    items = [
        {
            "id": row["id"],
            "status": row["status"],
            "executor_id": row["executor_id"],
            "stage": row["stage"],
            "error": task_error.build(
                protocol.CANCELLED,
                f"the debug executor serving {row['app_name'][:300]!r} is gone: nothing"
                " will run this task",
                stage=row["stage"],
                reason=DEBUG_GONE,
            ),
            "exit_code": 130,
            "retryable": False,
            "next_run": None,
        }
        for row in rows
    ]
    failed = await store.fail_tasks(items, now=now)
    if failed:
        logger.info(
            "Tasks of debug queues whose executor is gone failed",
            extra={
                "event": "debug_tasks_failed",
                "count": len(failed),
                "queues": sorted({row["app_name"][:128] for row in rows})[:20],
            },
        )
    return len(failed)


async def requeue_suspended(store: base.EngineStore, now: datetime, settings: Settings) -> int:
    """Queue SUSPENDED tasks again at the stage they were on."""
    return await store.requeue_suspended(now=now, limit=settings.batch)


async def release_timers(store: base.EngineStore, now: datetime, settings: Settings) -> int:
    """Resume tasks whose Timer is due at the next stage."""
    return await store.release_timers(now=now, limit=settings.batch)


async def schedule_due(store: base.EngineStore, now: datetime, settings: Settings) -> int:
    """Queue due IDLE tasks (new, delayed retries) and ended cron tasks at their fire time."""
    return await store.queue_due(now=now, limit=settings.batch)


async def collect_garbage(store: base.EngineStore, now: datetime, settings: Settings) -> int:
    """Delete old ended tasks, notifications, events and forgotten executors."""
    total = 0
    for what, keep in (
        ("tasks", settings.task_retention),
        ("notifications", settings.notification_retention),
        ("events", settings.event_retention),
        ("executors", settings.executor_retention),
    ):
        limit = settings.batch * 10
        for _ in range(GC_ROUNDS):  # keep up with busy clusters, but bound one tick's work
            deleted = await store.prune(what, before=now - keep, limit=limit)
            total += deleted
            if deleted < limit:
                break
    return total


UNSERVED_EVERY = timedelta(seconds=30)
"""How often the leader looks for apps with queued tasks and no live executor."""
UNSERVED_GRACE = 10.0
"""Seconds an app's oldest queued task must have waited before it is reported (an executor may
be starting)."""
UNSERVED_LINES = 20
"""Most apps named in the log per look; the rest are counted in one line."""
UNSERVED_KEPT = 1000
"""Most apps remembered as reported (so each is reported once while it stays unserved)."""


async def watch_unserved(store: base.EngineStore, now: datetime, reported: set[str]) -> int:
    """Log once per app whose tasks are QUEUED while no live executor serves it.

    ``reported`` holds the apps already reported; an app served again (or with nothing queued)
    leaves it with one INFO line. Returns how many apps were newly reported.
    """
    rows = await store.unserved_apps(
        now=now, alive_since=now - defaults.ALIVE_WITHIN, limit=UNSERVED_KEPT
    )
    waiting = {row["app"]: row for row in rows if row["waiting_s"] >= UNSERVED_GRACE}
    for app in sorted(reported - waiting.keys()):
        reported.discard(app)
        logger.info(
            "An app is served again or has nothing queued",
            extra={"event": "app_served", "app": app[:128]},
        )
    new = [row for app, row in waiting.items() if app not in reported]
    for row in new[:UNSERVED_LINES]:
        logger.warning(
            "Tasks queued for an app no live executor serves: start `kaiju-tasks executor --app"
            " %s` or add it to [executor] apps; the tasks fail at their deadline",
            row["app"][:128],
            extra={
                "event": "app_unserved",
                "app": row["app"][:128],
                "queued": row["queued"],
                "waiting_s": round(row["waiting_s"], 1),
            },
        )
    if len(new) > UNSERVED_LINES:
        logger.warning(
            "%d more apps have queued tasks and no live executor",
            len(new) - UNSERVED_LINES,
            extra={"event": "app_unserved_more", "apps": len(new) - UNSERVED_LINES},
        )
    reported.update(row["app"] for row in new[: UNSERVED_KEPT - len(reported)])
    return len(new)
