"""Manager: ``run()`` (advisory-lock leadership, wake-ups, interval) and ``tick(now)``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from kaiju_tasks import clock as clock_
from kaiju_tasks import defaults, errors, logs, notifications
from kaiju_tasks.manager import steps
from kaiju_tasks.store import base

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL = defaults.MANAGER_INTERVAL
DEFAULT_GC_INTERVAL = defaults.MANAGER_GC_INTERVAL
DEFAULT_STANDBY_INTERVAL = defaults.MANAGER_STANDBY_INTERVAL

Duty = Callable[[base.EngineStore, datetime, steps.Settings], Awaitable[int]]

SCHEDULER_DUTIES: tuple[tuple[str, Duty], ...] = (
    ("expire_timeouts", steps.expire_timeouts),
    ("rescue_stale", steps.rescue_stale),
    ("fail_debug_orphans", steps.fail_debug_orphans),
    ("requeue_suspended", steps.requeue_suspended),
    ("release_timers", steps.release_timers),
    ("schedule_due", steps.schedule_due),
)
SILENCE_DUTIES = frozenset({steps.rescue_stale, steps.fail_debug_orphans})
"""Duties that judge executors by their silence: they are told since when the leader watched
(``observed_since``)."""


class Manager:
    """Moves tasks through their statuses; only the leader of a database does.

    Args:
        store: the engine store.
        leadership: the advisory lock that elects one leader (None: always lead, for tests).
        dsn: enables LISTEN wake-ups (handed-back tasks are re-queued at once).
        clock: the time source (``SystemClock``; ``testing.FrozenClock`` in tests).
        settings: the duties' tunables (batch size, stale_after, retention periods).
        interval: time between ticks (time-based duties: timers, deadlines, cron).
        gc_interval: time between garbage-collection rounds.
        standby_interval: how often a standby tries to take the leadership.
        scheduler: run the scheduling duties.
        gc: run garbage collection (every ``gc_interval``).
    """

    def __init__(
        self,
        store: base.EngineStore,
        *,
        leadership: base.Leadership | None = None,
        dsn: str | None = None,
        clock: clock_.Clock | None = None,
        settings: steps.Settings | None = None,
        interval: timedelta = DEFAULT_INTERVAL,
        gc_interval: timedelta = DEFAULT_GC_INTERVAL,
        standby_interval: timedelta = DEFAULT_STANDBY_INTERVAL,
        scheduler: bool = True,
        gc: bool = True,
    ) -> None:
        self.store = store
        self._duties: base.EngineStore = store  # where the duties run (see _run)
        self.leadership = leadership
        self.clock: clock_.Clock = clock or clock_.SystemClock()
        self.settings = settings or steps.Settings()
        self.interval = interval
        self.gc_interval = gc_interval
        self.standby_interval = standby_interval
        self.scheduler = scheduler
        self.gc = gc
        self.is_leader = False
        self.observed_since: datetime | None = None
        """When this leader's unbroken view of the database began: the leadership taken, or
        the first tick that worked after one the database failed. Rescues count an executor's
        silence from no earlier than this (see ``steps.rescue_stale``)."""
        self._last_gc: datetime | None = None
        self._last_unserved: datetime | None = None
        self._unserved: set[str] = set()  # apps reported as queued with no live executor
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._outage = logs.Outage(logger, "manager")
        self._listener = (
            notifications.Listener(dsn, {notifications.MANAGER: self._poke}, name="manager")
            if dsn
            else None
        )

    def _poke(self, _payload: str) -> None:
        self._wake.set()

    async def tick(self, now: datetime) -> dict[str, int]:
        """Run every duty once; return what each did."""
        store = self._duties
        done: dict[str, int] = {}
        if self.scheduler:
            for name, duty in SCHEDULER_DUTIES:
                if duty in SILENCE_DUTIES:
                    done[name] = await duty(
                        store, now, self.settings, observed_since=self.observed_since
                    )
                else:
                    done[name] = await duty(store, now, self.settings)
            if self._last_unserved is None or now - self._last_unserved >= steps.UNSERVED_EVERY:
                done["watch_unserved"] = await steps.watch_unserved(store, now, self._unserved)
                self._last_unserved = now
        if self.gc and (self._last_gc is None or now - self._last_gc >= self.gc_interval):
            done["collect_garbage"] = await steps.collect_garbage(store, now, self.settings)
            self._last_gc = now
        if any(done.values()):
            logger.debug("Manager tick", extra={"event": "manager_tick", **done})
        return done

    async def __aenter__(self) -> Manager:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Run in the background."""
        if self._listener is not None:
            await self._listener.start()
        self._task = asyncio.create_task(self._run(), name="kaiju-tasks-manager")

    async def stop(self) -> None:
        """Stop and give up leadership."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._listener is not None:
            await self._listener.stop()
        if self.leadership is not None:
            await self.leadership.release()
        self.is_leader = False

    async def run(self) -> None:
        """Run until cancelled."""
        await self.start()
        try:
            assert self._task is not None
            await self._task
        finally:
            await self.stop()

    async def _run(self) -> None:
        while True:
            try:
                leading = self.leadership is None or await self.leadership.hold()
            except errors.StoreError as exc:
                self._outage.failed(exc)
                leading = False
            except Exception:
                logger.exception("Leadership check failed", extra={"event": "leader_error"})
                leading = False
            else:
                if not leading:
                    self._outage.ok()  # a standby that reached the database
            if leading != self.is_leader:
                self.is_leader = leading
                self.observed_since = None  # a new view of the database starts
                # The duties run where the leadership is held (fenced), or on the pool.
                self._duties = (
                    self.leadership.fenced(self.store)
                    if leading and self.leadership is not None
                    else self.store
                )
                logger.info(
                    "Manager leadership changed",
                    extra={"event": "leader_elected" if leading else "leader_standby"},
                )
            if not leading:
                await asyncio.sleep(self.standby_interval.total_seconds())
                continue
            self._wake.clear()  # before the tick: a poke during it is kept
            now = self.clock.now()
            if self.observed_since is None:
                self.observed_since = now
            try:
                await self.tick(now)
            except errors.StoreError as exc:
                # The database was out of reach: what executors did meanwhile was not seen.
                self.observed_since = None
                self._outage.failed(exc)
            except Exception:
                logger.exception("Manager tick failed", extra={"event": "manager_tick_failed"})
            else:
                self._outage.ok()
            with contextlib.suppress(TimeoutError):  # asyncio.timeout never loses a cancel
                async with asyncio.timeout(self.interval.total_seconds()):
                    await self._wake.wait()
