"""Following a cluster live: EventReceiver reads lifecycle events, State keeps a picture.

```python
receiver = EventReceiver(dsn, handlers={"task-failed": on_failure, "*": state.event})
await receiver.capture(timeout=60)          # or: async for event in receiver: ...
```

Events live in PostgreSQL, so a receiver that was disconnected catches up where it stopped:
it reads events in the order of their transactions and only from transactions that have all
ended, so it misses none and repeats none (see ``events_after`` in ``store/queries.sql``).
It wakes on the ``kaiju_tasks_events`` notification and also polls.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from kaiju_tasks import insights, notifications, redact
from kaiju_tasks.store import base

logger = logging.getLogger(__name__)

Event = insights.Event
Handler = Callable[[Event], Any]

DEFAULT_POLL_INTERVAL = timedelta(seconds=1)
DEFAULT_BATCH = 500


class EventReceiver:
    """Reads lifecycle events in order, live and after a disconnect.

    Args:
        dsn: the database.
        handlers: event type -> callable (sync or async); ``"*"`` receives every event.
        after_id: start after this event id; None starts after the newest event ("now");
            0 starts from the oldest event kept.
        poll_interval: longest wait between reads when no notification arrives.
    """

    def __init__(
        self,
        dsn: str,
        handlers: Mapping[str, Handler] | None = None,
        *,
        after_id: int | None = None,
        poll_interval: timedelta = DEFAULT_POLL_INTERVAL,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        self.dsn = dsn
        self.handlers = dict(handlers or {})
        self.after_id = after_id
        self.poll_interval = poll_interval
        self.batch = batch
        self.cursor: tuple[str, int] | None = None
        self.last_id: int | None = None
        self.ready = asyncio.Event()
        """Set once the receiver listens and knows where it starts."""
        self._wake = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[Event]:
        async with insights.connect(self.dsn, application_name="kaiju-tasks-receiver") as store:
            reads = insights.Insights(store)
            listener = notifications.Listener(self.dsn, {notifications.EVENTS: self._poke})
            try:
                await listener.start()
                if self.cursor is None and self.after_id != 0:
                    self.cursor = await reads.event_cursor(self.after_id)
                self.ready.set()  # listening and placed: every later event will be read
                while True:
                    self._wake.clear()
                    try:
                        events = await reads.events_after(self.cursor, limit=self.batch)
                    except Exception as exc:  # noqa: BLE001 - a lost connection: retry, catch up
                        logger.warning(
                            "Reading events failed",
                            extra={
                                "event": "receiver_read_failed",
                                "error": redact.text(str(exc)),
                            },
                        )
                        events = []
                    for cursor, event in events:
                        self.cursor = cursor
                        self.last_id = event["id"]
                        yield event
                    if len(events) == self.batch:
                        continue
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                    # cancellation that lands as the wait ends, and the loop would go on.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_interval.total_seconds()):
                            await self._wake.wait()
            finally:
                await listener.stop()

    def _poke(self, _payload: str) -> None:
        self._wake.set()

    async def dispatch(self, event: Event) -> None:
        """Call the handlers of ``event``; a failing handler is logged, never raised."""
        for key in (event["type"], "*"):
            handler = self.handlers.get(key)
            if handler is None:
                continue
            try:
                result = handler(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception(
                    "Event handler failed",
                    extra={"event": "event_handler_failed", "type": event["type"]},
                )

    async def capture(
        self,
        limit: int | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> int:
        """Dispatch events until ``limit`` were handled or ``timeout`` seconds passed."""
        count = 0

        async def run() -> None:
            nonlocal count
            async for event in self:
                await self.dispatch(event)
                count += 1
                if limit is not None and count >= limit:
                    return

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await run()
        return count


# -- state ------------------------------------------------------------------------------------

_TASK_TIMES = {
    "task-sent": "sent",
    "task-received": "received",
    "task-started": "started",
    "task-succeeded": "succeeded",
    "task-failed": "failed",
    "task-retried": "retried",
    "task-revoked": "revoked",
    "task-rejected": "rejected",
}


@dataclasses.dataclass
class TaskState:
    """What events tell about one task."""

    id: str
    app_name: str | None = None
    job_id: str | None = None
    status: str | None = None
    stage: int | None = None
    stages: int | None = None
    executor_id: str | None = None
    result: Any = None
    error: Any = None
    times: dict[str, datetime] = dataclasses.field(default_factory=dict)
    """Event name without ``task-`` -> when it last happened."""

    @property
    def runtime(self) -> timedelta | None:
        """From start to success or failure, when both are known."""
        end = self.times.get("succeeded") or self.times.get("failed")
        start = self.times.get("started")
        return end - start if end and start else None


@dataclasses.dataclass
class WorkerState:
    """What events tell about one executor."""

    id: str
    last_heartbeat: datetime | None = None
    online: bool = False
    active: int = 0
    apps: list[str] = dataclasses.field(default_factory=list)

    def alive(self, now: datetime, within: timedelta = timedelta(seconds=30)) -> bool:
        """Online and heard from within ``within`` of ``now``."""
        return (
            self.online and self.last_heartbeat is not None and now - self.last_heartbeat < within
        )


class State:
    """A picture of the cluster kept up to date from events (like Celery's ``State``).

    Memory is bounded: at most ``max_tasks`` tasks are kept, the least recently updated
    forgotten first.
    """

    def __init__(self, max_tasks: int = 10000) -> None:
        self.max_tasks = max_tasks
        self.tasks: collections.OrderedDict[str, TaskState] = collections.OrderedDict()
        self.workers: dict[str, WorkerState] = {}
        self.event_count = 0
        self.last_id: int | None = None

    def event(self, event: Event) -> None:
        """Apply one event."""
        self.event_count += 1
        self.last_id = event.get("id", self.last_id)
        kind = event["type"]
        if kind.startswith("worker-"):
            self._worker(event)
        elif event.get("task_id"):
            self._task(event)

    def _worker(self, event: Event) -> None:
        worker_id = event.get("executor_id")
        if not worker_id:
            return
        worker = self.workers.setdefault(worker_id, WorkerState(worker_id))
        data = event.get("data") or {}
        worker.last_heartbeat = event["created"]
        worker.online = event["type"] != "worker-offline"
        if "active" in data:
            worker.active = data["active"]
        if "apps" in data:
            worker.apps = list(data["apps"])

    def _task(self, event: Event) -> None:
        task_id = event["task_id"]
        task = self.tasks.pop(task_id, None) or TaskState(task_id)
        self.tasks[task_id] = task  # most recently updated last
        while len(self.tasks) > self.max_tasks:
            self.tasks.popitem(last=False)
        task.job_id = event.get("job_id") or task.job_id
        task.status = event.get("status") or task.status
        task.stage = event.get("stage") if event.get("stage") is not None else task.stage
        task.app_name = event.get("app_name") or task.app_name
        task.stages = event.get("stages") or task.stages
        if event.get("executor_id"):
            task.executor_id = event["executor_id"]
        data = event.get("data") or {}
        if "result" in data:
            task.result = data["result"]
        if "error" in data:
            task.error = data["error"]
        name = _TASK_TIMES.get(event["type"])
        if name:
            task.times[name] = event["created"]

    async def rebuild(self, dsn: str) -> int:
        """Replay every kept event from the oldest; return how many were applied."""
        async with insights.connect(
            dsn, application_name="kaiju-tasks-receiver", max_size=1
        ) as store:
            reads = insights.Insights(store)
            cursor: base.EventCursor | None = None
            count = 0
            while True:
                events = await reads.events_after(cursor, limit=DEFAULT_BATCH, snapshot=True)
                for _, event in events:
                    self.event(event)
                    count += 1
                if len(events) < DEFAULT_BATCH:
                    return count
                cursor = events[-1][0]


def format_event(event: Event, *, verbose: bool = False) -> str:
    """One line per event, as ``kaiju-tasks events`` prints it."""
    created: datetime = event["created"]
    kind = event["type"].upper()
    if kind.startswith("WORKER-"):
        line = f"[{created:%Y-%m-%d %H:%M:%S}] {kind} {event.get('executor_id')}"
    else:
        stage = event.get("stage")
        stages = event.get("stages")
        # Counted from 0, as in the API, templates ([0.data]), results and errors.
        where = "-" if stage is None else f"{stage}/{stages}" if stages else str(stage)
        line = (
            f"[{created:%Y-%m-%d %H:%M:%S}] {kind} {event.get('app_name') or '-'} "
            f"(STATUS={event.get('status')}, ID={event.get('task_id')}, STAGE={where})"
        )
    if verbose:
        details = {k: event.get(k) for k in ("job_id", "executor_id") if event.get(k)}
        details.update(event.get("data") or {})
        if details:
            line += " " + " ".join(f"{k}={v}" for k, v in details.items())
    return line
