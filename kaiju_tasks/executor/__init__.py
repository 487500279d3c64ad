"""Executor: claims tasks, runs their stages, heartbeats, records results.

This module holds the executor's life (start, stop, registration, heartbeats) and its claim
loop; one task's run is :mod:`kaiju_tasks.executor.pipeline` and the writes that commit how runs
went are :mod:`kaiju_tasks.executor.outcome`.

A claimed task runs as a pipeline: evaluate the stage's condition, render its method and params
from ``{id, kws, executor, "0", "1", ...}``, call it (in-process or over HTTP) within the stage's
``max_timeout`` and the task's ``exec_deadline``, and commit the result before the next stage
starts. A Timer or Message stage parks the task (WAITING) and frees the slot. Every write is
guarded by (status EXECUTED, this executor, this stage): if the task was cancelled, timed out or
rescued meanwhile, the write does not apply and the executor lets the task go.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from kaiju_tasks import batch, defaults, errors, logs, models, notifications
from kaiju_tasks import clock as clock_
from kaiju_tasks import methods as methods_
from kaiju_tasks.executor import outcome, pipeline
from kaiju_tasks.manager import steps
from kaiju_tasks.rpc import client as rpc_client
from kaiju_tasks.store import base

logger = logging.getLogger(__name__)

DEFAULT_CONCURRENCY = defaults.EXECUTOR_CONCURRENCY
DEFAULT_PREFETCH = defaults.EXECUTOR_PREFETCH
"""The most tasks claimed ahead of free slots; see :meth:`Executor._ahead` for how many are."""
DEFAULT_POLL_INTERVAL = defaults.EXECUTOR_POLL_INTERVAL
DEFAULT_HEARTBEAT_INTERVAL = defaults.EXECUTOR_HEARTBEAT_INTERVAL
DEFAULT_SHUTDOWN_GRACE = defaults.EXECUTOR_SHUTDOWN_GRACE
LEASE_HEARTBEATS = defaults.EXECUTOR_LEASE_HEARTBEATS
"""The default lease, in heartbeat intervals (see ``Executor``'s ``lease``)."""
MAX_LEASE = defaults.MAX_LEASE
LEASE_USED = 0.75
"""The share of its lease after which an executor that has not heartbeated starts no call: the
rest covers the difference between its clock and the manager's."""
RETRY_MAX_DELAY = outcome.RETRY_MAX_DELAY
"""Longest wait, in seconds, between two tries of a write or heartbeat the database failed."""
DEBUG_MARK = models.DEBUG_MARK


class Executor(pipeline.Pipeline):
    """Runs tasks of ``apps``; use ``async with Executor(...)`` or ``run()``.

    Args:
        store: the engine store.
        apps: app names whose tasks this executor claims.
        methods: in-process methods stages may call.
        app_urls: ``app_name -> JSON-RPC URL`` for stages of apps served over HTTP.
        dsn: enables LISTEN/NOTIFY wake-ups and cancellations (polling works without it).
        clock: the time source (``SystemClock``; ``testing.FrozenClock`` in tests).
        executor_id: this executor's id (default: ``host-pid-random``).
        concurrency: stage calls in flight at once (for a batched app: batch requests).
        app_token: bearer token sent with stage calls over HTTP (for apps behind auth).
        prefetch: the most tasks claimed ahead of free slots (0 for none). The executor claims
            ahead only as many as its slots free during one claim, by the call and claim times
            it measures: short stages get the whole allowance, long ones one or two (so that
            executors sharing a queue do not hold tasks they cannot start soon). Prefetched
            tasks are held by this executor (rescued if it dies) but their stages have not
            started; one that waits a second behind stages that got slower since the claim is
            handed back to the queue (see ``Pipeline._first_slot``).
        data: the ``executor`` part of the template data.
        poll_interval: longest idle wait between claims when no notification arrives.
        heartbeat_interval: how often liveness is recorded (the manager rescues tasks of
            executors silent for several intervals).
        lease: how long after its last heartbeat this executor may still start stage calls
            (default three heartbeat intervals; at least two). It starts none once three
            quarters of it have passed without a heartbeat the database took (a cut network,
            an outage), and abandons the calls in flight (see :meth:`_lease_ran_out`); other
            calls wait for the next heartbeat, and runs the manager rescued
            meanwhile are abandoned before they call. The lease is recorded with the
            executor, and the manager rescues its tasks no earlier than the lease's end,
            whatever its ``stale_after``.
        shutdown_grace: how long ``stop()`` lets running stages finish before handing their
            tasks back (SUSPENDED, re-queued at once).
        app_batch: ``app_name -> N``: stage calls to that app's URL go out as JSON-RPC batch
            requests of up to N calls (see ``rpc.client.CallBatches``); the app's service
            must accept batches. Such calls take no slot: up to ``concurrency`` requests are
            in flight to the app, and an executor whose apps are all batched claims enough
            tasks to fill them (``concurrency`` x N).
        debug: serve private queues ``<app>@debug-<random>`` instead of ``apps`` (see
            ``debug_queues``): tasks created for those names (or copied there with
            ``tasks.copy``) run here only, production executors never take them, and they are
            failed (reason ``debug_executor_gone``) once this executor is gone.
    """

    def __init__(
        self,
        store: base.EngineStore,
        *,
        apps: Sequence[str] = ("default",),
        methods: methods_.Methods | None = None,
        app_urls: Mapping[str, str] | None = None,
        dsn: str | None = None,
        clock: clock_.Clock | None = None,
        executor_id: str | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        prefetch: int = DEFAULT_PREFETCH,
        app_token: str | None = None,
        data: Mapping[str, Any] | None = None,
        poll_interval: timedelta = DEFAULT_POLL_INTERVAL,
        heartbeat_interval: timedelta = DEFAULT_HEARTBEAT_INTERVAL,
        shutdown_grace: timedelta = DEFAULT_SHUTDOWN_GRACE,
        app_batch: Mapping[str, int] | None = None,
        debug: bool = False,
        lease: timedelta | None = None,
    ) -> None:
        if concurrency < 1:
            raise errors.ConfigError("concurrency must be at least 1")
        lease = LEASE_HEARTBEATS * heartbeat_interval if lease is None else lease
        if not 2 * heartbeat_interval <= lease <= MAX_LEASE:
            raise errors.ConfigError(
                f"lease ({lease.total_seconds():g} s) must be at least twice the heartbeat"
                f" interval ({heartbeat_interval.total_seconds():g} s) and at most"
                f" {MAX_LEASE.total_seconds():g} s"
            )
        for app in apps:
            if DEBUG_MARK in app:
                raise errors.ConfigError(
                    f"app {app[:128]!r}: names with {DEBUG_MARK!r} are the private queues of"
                    " debug executors (start one with --debug instead)"
                )
        self.store = store
        self.debug = debug
        self.app_urls = dict(app_urls or {})
        self.debug_queues: dict[str, str] = {}
        """In debug mode, ``app -> its private queue``: the ``app_name`` to give tasks."""
        if debug:
            tag = f"{DEBUG_MARK}{uuid.uuid4().hex[:8]}"
            self.debug_queues = {app: f"{app}{tag}" for app in apps}
            for app, queue in self.debug_queues.items():
                if app in self.app_urls:
                    self.app_urls[queue] = self.app_urls[app]
        self.apps = list(self.debug_queues.values()) if debug else list(apps)
        self.methods = methods if methods is not None else methods_.Methods()
        self.clock: clock_.Clock = clock or clock_.SystemClock()
        self.id = executor_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.concurrency = concurrency
        if prefetch < 0:
            raise errors.ConfigError("prefetch must be at least 0")
        self.prefetch = prefetch
        # Moving averages (seconds) of a stage call and of a claim, for _ahead; None until seen.
        self._call_s: float | None = None
        self._claim_s: float | None = None
        # While a stall shows (see Pipeline._behind): the call time the slots' pace implies.
        self._stalled_s: float | None = None
        # Stage calls run in at most `concurrency` slots; up to `prefetch` more tasks are claimed
        # ahead so that the next claim overlaps the running stages instead of following them.
        self._slots = asyncio.Semaphore(concurrency)
        self.data = dict(data or {})
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.lease = lease
        # Stage calls start only before this (time.monotonic()); renewed by heartbeats.
        self._lease_until = -math.inf
        # The calls in flight are abandoned at _watch_until (time.monotonic()), unless a
        # heartbeat the database took moves it on (see _lease_ran_out).
        self._watch_until = -math.inf
        self._lease_watch: asyncio.TimerHandle | None = None
        self._in_call: set[str] = set()  # task ids whose stage call is in flight
        self._lease_renewed = asyncio.Event()
        self._lease_lapsed = False  # logged once per lapse
        self._heartbeats_done = asyncio.Event()  # set by stop()
        self.shutdown_grace = shutdown_grace
        batch_sizes = dict(app_batch or {})
        # As many connections as requests may be in flight (the slots, and `concurrency` batch
        # requests per batched app), so that no call that passed the lease check then waits
        # for a connection (aiohttp's default is 100).
        batched_apps = sum(1 for app, size in batch_sizes.items() if size > 1)
        self.client = rpc_client.Client(
            token=app_token, connections=max(100, concurrency * (1 + batched_apps))
        )
        for app, queue in self.debug_queues.items():
            if app in batch_sizes:
                batch_sizes[queue] = batch_sizes[app]
        # A batched app's calls take no slot: up to `concurrency` batch requests of up to N
        # calls each are in flight to it (see Pipeline._batched_call).
        self._call_batches = {
            app: rpc_client.CallBatches(
                self.client, self.app_urls[app], size, in_flight=concurrency, ready=self._leased
            )
            for app, size in batch_sizes.items()
            if size > 1 and app in self.app_urls
        }
        # The stage calls this executor may have in flight, which its claims keep it fed for:
        # `concurrency`, or `concurrency` x N when every app it serves is batched (N the
        # smallest batch, so that no app gets more calls than its requests carry: a call
        # waiting for its batch has its deadline running), so that batches can fill. An
        # executor serving batched and unbatched apps stays at `concurrency`: its claims cannot
        # tell which app's tasks they take.
        self.capacity = concurrency
        if self._call_batches and all(app in self._call_batches for app in self.apps):
            self.capacity = concurrency * min(b.max_batch for b in self._call_batches.values())
        self._running: dict[str, asyncio.Task[None]] = {}
        self._claims: dict[str, str] = {}  # task id -> the claim id of its current run
        # Runs committing a stage's outcome (claim ids): past their last call, or between two
        # stages. They need no slot, so they leave room for a claim (see _room).
        self._settling: set[str] = set()
        self._backlog = True  # whether the last claim took all it asked for (more may wait)
        # Writes of many tasks share statements (group commit); see kaiju_tasks.batch.
        self._record = batch.Batcher(self._record_stages, batch.applied_ids)
        self._finish_batch = batch.Batcher(self._finish_tasks, batch.applied_ids)
        self._wait_batch = batch.Batcher(self._wait_tasks, batch.applied_ids)
        self._fail_batch = batch.Batcher(self._fail_tasks, batch.applied_rows)
        self._release_batch = batch.Batcher(self._release_tasks, batch.applied_ids)
        # Runs claimed ahead waiting for the slot of their first call (claim ids); see
        # Pipeline._first_slot.
        self._waiting: dict[str, int] = {}
        self._queued_runs = 0
        self._slot_starts = 0
        self._revoked: set[str] = set()
        self._wake = asyncio.Event()
        self._claim_lock = asyncio.Lock()
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._unstarted: list[str] = []  # claim ids claimed while stopping, to hand back
        # The loss of the database is logged once, then reminded, then its return.
        self._outage = logs.Outage(logger, f"executor {self.id}")
        self._listener = (
            notifications.Listener(
                dsn,
                {notifications.QUEUED: self._on_queued, notifications.CANCEL: self._on_cancel},
                name=f"executor {self.id}",
            )
            if dsn
            else None
        )

    # -- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Executor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Register, start listening, claiming and heartbeating in the background."""
        sent = time.monotonic()
        await self._register()
        self._renew_lease(sent)
        logger.info(
            "Executor online",
            extra={"event": "executor_online", "executor_id": self.id, "apps": self.apps},
        )
        for app, queue in self.debug_queues.items():
            logger.warning(
                "Debug executor: serving %s only, never %s. Route a task here with app_name %s"
                " (or `kaiju-tasks task copy ID --app %s`); its tasks fail once this executor"
                " stops",
                queue,
                app[:128],
                queue,
                queue,
                extra={"event": "debug_queue", "executor_id": self.id, "app": app, "queue": queue},
            )
        if self._listener is not None:
            await self._listener.start()
        self._loops = [
            asyncio.create_task(self._claim_loop(), name=f"kaiju-tasks-claim-{self.id}"),
            asyncio.create_task(self._heartbeat_loop(), name=f"kaiju-tasks-heartbeat-{self.id}"),
        ]

    async def _register(self) -> None:
        await self.store.register_executor(
            self.id,
            apps=self.apps,
            host=socket.gethostname(),
            pid=os.getpid(),
            concurrency=self.concurrency,
            now=self.clock.now(),
            debug=self.debug,
            lease=self.lease,
        )

    # -- the lease ----------------------------------------------------------------------------

    def _usable_until(self, sent: float) -> float:
        """When the lease of a heartbeat sent at ``sent`` (monotonic) stops covering calls."""
        return sent + LEASE_USED * self.lease.total_seconds()

    def _renew_lease(self, sent: float) -> None:
        """A heartbeat sent at ``sent`` (monotonic) was recorded: calls may start until then."""
        until = self._usable_until(sent)
        self._watch(sent)
        if until > self._lease_until:
            self._lease_until = until
        if time.monotonic() < self._lease_until and not self._lease_renewed.is_set():
            self._lease_renewed.set()
            self._wake.set()  # the claim loop, which claims nothing while the lease is out
            if self._lease_lapsed:
                self._lease_lapsed = False
                logger.info(
                    "Lease renewed: stage calls start again",
                    extra={"event": "lease_renewed", "executor_id": self.id},
                )

    def _watch(self, sent: float) -> None:
        """A heartbeat sent at ``sent`` was recorded: the calls in flight may go on until then.

        Called as soon as the database took the beat, before the runs it took away are
        abandoned (which the lease itself waits for).
        """
        until = self._usable_until(sent)
        if until <= self._watch_until:
            return
        self._watch_until = until
        if self._lease_watch is None:
            self._lease_watch = asyncio.get_running_loop().call_later(
                max(0.0, until - time.monotonic()), self._lease_ran_out
            )

    def _lease_ran_out(self) -> None:
        """No heartbeat for three quarters of the lease: abandon the calls in flight.

        The manager may rescue their runs once the lease is over, and a request still queued
        on this host (a cut link retransmits it when it comes back) must not reach the service
        after that. Their connections are reset (see ``rpc.client``), so what the service has
        not received it never will; their runs end without a write, and their tasks are
        rescued by the manager or handed back by the next heartbeat (as orphans).
        """
        self._lease_watch = None
        if self._heartbeats_done.is_set():
            return
        left = self._watch_until - time.monotonic()
        if left > 0:  # a heartbeat moved it on (or the timer fired early): watch on
            self._lease_watch = asyncio.get_running_loop().call_later(left, self._lease_ran_out)
            return
        self._lease_held()  # notes the lapse
        calling = [task_id for task_id in self._in_call if task_id in self._running]
        self._abandon_batches()
        for task_id in calling:
            self._revoke(task_id)
        if calling:
            logger.warning(
                "Lease lapsed: %d stage calls in flight abandoned",
                len(calling),
                extra={"event": "calls_abandoned", "executor_id": self.id, "count": len(calling)},
            )

    def _abandon_batches(self) -> None:
        """Reset the batch requests out and drop the batched calls waiting.

        Their runs are cancelled by the caller (a lapse, or ``stop()``).
        """
        for batches in self._call_batches.values():
            batches.abandon()

    def _lease_held(self) -> bool:
        """Whether a stage call may start now (see :meth:`_leased`); notes a lapse once."""
        if time.monotonic() < self._lease_until:
            return True
        if self._lease_renewed.is_set():
            self._lease_renewed.clear()
            if not self._lease_lapsed and math.isfinite(self._lease_until):
                self._lease_lapsed = True
                logger.warning(
                    "Lease lapsed: no heartbeat recorded for %g s; stage calls wait for the"
                    " next one",
                    LEASE_USED * self.lease.total_seconds(),
                    extra={"event": "lease_lapsed", "executor_id": self.id},
                )
        return False

    async def _leased(self) -> None:
        """Wait until this executor's lease allows a stage call to start.

        Past three quarters of the lease without a recorded heartbeat, the manager may be about
        to rescue this executor's tasks: a call started now could run beside the run that
        replaces it. The wait ends with the next heartbeat (or with the run cancelled, if the
        manager rescued it meanwhile: the heartbeat abandons such runs before renewing).
        """
        while not self._lease_held():
            await self._lease_renewed.wait()

    async def run(self) -> None:
        """Run until cancelled, then stop cleanly."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Stop claiming, let running stages finish within the grace period, hand back the rest."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        # The claim loop ends by itself once the claim in flight returns (its tasks are handed
        # back, see tick): a claim cancelled midway may still commit, leaving tasks EXECUTED by
        # an executor that is gone. Only a claim that hangs past the grace period is cancelled.
        # Heartbeats go on until the runs have ended: they keep the lease, without which the
        # runs could start no more calls during the grace period.
        claim_loops, heartbeats = self._loops[:1], self._loops[1:]
        if claim_loops:
            await asyncio.wait(claim_loops, timeout=self.shutdown_grace.total_seconds())
        for loop in claim_loops:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        running = list(self._running.values())
        if running:
            await asyncio.wait(running, timeout=self.shutdown_grace.total_seconds())
        left = [task_id for task_id, runner in self._running.items() if not runner.done()]
        claims = [self._claims[t] for t in left if t in self._claims]  # before the runners end
        for task_id in left:
            self._running[task_id].cancel()
        if left:
            await asyncio.wait([self._running[t] for t in left])
        # Batch requests still out carry calls of runs about to be handed back: reset them, so
        # that none reaches the service after its task was re-queued.
        self._abandon_batches()
        # The heartbeat loop ends after the beat in progress: cancelled amid a query, it would
        # wait for the query's cancellation, which a cut network can hold up for long.
        self._heartbeats_done.set()
        if self._lease_watch is not None:
            self._lease_watch.cancel()
        if heartbeats:
            await asyncio.wait(heartbeats, timeout=self.shutdown_grace.total_seconds())
        for loop in heartbeats:
            loop.cancel()
        try:
            # Every run has ended: whatever the database still says this executor holds is
            # handed back too (a claim whose reply was lost, one cancelled at the deadline).
            claims += self._unstarted + await self.store.orphans(self.id, [])
            if claims:
                # Also wakes the manager: re-queued at once, not at its next tick.
                handed = await self.store.suspend_executor_tasks(
                    self.id, sorted(set(claims)), now=self.clock.now()
                )
                logger.info(
                    "Tasks handed back",
                    extra={
                        "event": "tasks_handed_back",
                        "executor_id": self.id,
                        "count": len(handed),
                    },
                )
            await self.store.executor_stopped(self.id, now=self.clock.now())
            if self.debug:
                await self._drop_debug_queues()
        except errors.StoreError as exc:
            logger.warning(
                "Executor stopped without the database: the manager rescues its tasks once it"
                " sees it silent",
                extra={"event": "executor_stop_failed", "executor_id": self.id, "error": str(exc)},
            )
        if self._listener is not None:
            await self._listener.stop()
        await self.client.close()
        logger.info("Executor offline", extra={"event": "executor_offline", "executor_id": self.id})

    async def _drop_debug_queues(self) -> None:
        """Fail what is left in this debug executor's queues: nothing else will run it."""
        settings = steps.Settings()
        while True:  # each round logs what it failed
            done = await steps.fail_debug_orphans(
                self.store, self.clock.now(), settings, apps=self.apps
            )
            if done < settings.batch:
                break

    def _stop_asked(self) -> bool:
        return self._stopping

    def _room(self) -> int:
        """How many tasks a claim may take now.

        The runs that still have a call to make (running one, or waiting for a slot) are kept
        to ``capacity + prefetch``; the runs committing a stage's outcome (between two stages,
        or at their end) do not count, since their writes need no slot, but all the runs held
        stay under twice that, should those writes be slow.
        """
        window = self.capacity + self._ahead()
        held = len(self._running)
        calling = held - len(self._settling)
        return max(0, min(window - calling, 2 * window - held))

    def _ahead(self) -> int:
        """How many tasks to claim ahead of free slots now (see :func:`claim_ahead`).

        By the measured call time, or by the slower pace of the slots while a stall shows
        (see ``Pipeline._behind``).
        """
        call_s = self._call_s
        if self._stalled_s is not None:
            call_s = max(call_s or 0.0, self._stalled_s)
        return claim_ahead(self.prefetch, self.capacity, self._claim_s, call_s)

    @property
    def active(self) -> int:
        """Tasks this executor holds now: running, and claimed ahead (prefetched)."""
        return len(self._running)

    # -- wake-ups -----------------------------------------------------------------------------

    def _on_queued(self, app: str) -> None:
        if not app or app in self.apps:
            self._wake.set()

    def _on_cancel(self, payload: str) -> None:
        task_id, _, claim_id = payload.partition(" ")
        # A notice about an earlier run of the task must not stop the current one.
        if not claim_id or self._claims.get(task_id) == claim_id:
            self._revoke(task_id)

    def _revoke(self, task_id: str) -> None:
        runner = self._running.get(task_id)
        if runner is not None and not runner.done():
            self._revoked.add(task_id)
            runner.cancel()

    # -- loops --------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            # Cleared before the claim, so a notification that arrives during it is kept.
            self._wake.clear()
            try:
                claimed = await self.tick()
            except errors.StoreError as exc:
                self._outage.failed(exc)
                claimed = 0
            except Exception:
                logger.exception(
                    "Claim failed", extra={"event": "claim_failed", "executor_id": self.id}
                )
                claimed = 0
            if claimed and self._backlog and self._room() > 0:
                continue
            with contextlib.suppress(TimeoutError):  # asyncio.timeout never loses a cancel
                async with asyncio.timeout(self.poll_interval.total_seconds()):
                    await self._wake.wait()

    async def _heartbeat_loop(self) -> None:
        interval = self.heartbeat_interval.total_seconds()
        delay = interval
        retry: float | None = None  # the wait before the next try after a failed beat
        while not self._heartbeats_done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._heartbeats_done.wait()
                break  # stop() has no more use for heartbeats
            sent = time.monotonic()
            try:
                alive = await self.store.heartbeat(
                    self.id, active=self.active, now=self.clock.now()
                )
                if not alive:  # our row was pruned (a long outage): come back online
                    await self._register()
                self._watch(sent)  # the calls in flight may go on
                # Runs rescued while the lease had lapsed are abandoned first: only then may the
                # calls that waited for this heartbeat start.
                await self._revoke_taken()
                self._renew_lease(sent)
                await self._hand_back_orphans()
            except errors.StoreError as exc:
                self._outage.failed(exc)
                # Tried again soon: once the database is back, the manager must hear from us
                # (and we must learn which runs are no longer ours) well before stale_after.
                retry = 0.25 if retry is None else min(retry * 2, RETRY_MAX_DELAY, interval)
                delay = retry
                continue
            except Exception:
                logger.exception(
                    "Heartbeat failed", extra={"event": "heartbeat_failed", "executor_id": self.id}
                )
            else:
                self._outage.ok()
            retry = None
            # One beat every interval, however long this one took (the lease counts from it).
            delay = max(0.0, interval - (time.monotonic() - sent))

    async def _revoke_taken(self) -> None:
        """Abandon the runs whose task is no longer this run's (rescued, cancelled, claimed anew).

        A lost cancel notification costs only this delay.
        """
        if not self._running:
            return
        # Only the runs asked about: those claimed while the query ran are not in its answer.
        asked = {t: self._claims.get(t) for t in self._running}
        rows = await self.store.task_status(list(asked))
        for task_id, claim_id in asked.items():
            row = rows.get(task_id)
            if (
                row is None
                or row["status"] != "EXECUTED"
                or row["executor_id"] != self.id
                or row["claim_id"] != claim_id  # rescued, then claimed again: a newer run
            ) and self._claims.get(task_id) == claim_id:
                self._revoke(task_id)

    async def _hand_back_orphans(self) -> None:
        """Hand back the tasks this executor holds in the database but does not run.

        A claim or hand-back whose reply was lost leaves such an orphan.
        """
        async with self._claim_lock:  # a claim in flight is not an orphan
            orphans = await self.store.orphans(self.id, list(self._claims.values()))
        if orphans:
            logger.warning(
                "Orphaned tasks handed back",
                extra={
                    "event": "orphans_handed_back",
                    "executor_id": self.id,
                    "count": len(orphans),
                    "task_ids": orphans,
                },
            )
            await self.store.suspend_executor_tasks(self.id, orphans, now=self.clock.now())

    async def tick(self) -> int:
        """Claim as many tasks as there are free slots and start them; return how many."""
        free = self._room()
        if self._stopping:
            return 0
        if not self._lease_held():
            # Taken for lost, this executor may be rescued: what it claimed now could not
            # start, and a task it held before could come back to it as a second run.
            self._backlog = True
            return 0
        if free <= 0:
            # Woken with no room (a notification, the poll): what woke it may be waiting, so
            # the next freed room claims again even if the last claim came back short.
            self._backlog = True
            return 0
        async with self._claim_lock:
            started = time.monotonic()
            rows = await self.store.claim(self.apps, self.id, limit=free, now=self.clock.now())
            self._claim_s = pipeline._averaged(self._claim_s, time.monotonic() - started)
            self._outage.ok()
            if self._stop_asked():  # stop() began during the claim: these go back, unstarted
                self._unstarted += [row["claim_id"] for row in rows if row["claim_id"]]
                return 0
            self._backlog = len(rows) == free
            for row in rows:
                self._start(row)
        return len(rows)

    def _start(self, row: base.TaskRow) -> None:
        # A run of this task may still be returning (its last write committed a retry that
        # this executor claimed at once): the new run waits for it, and only the current
        # run's end removes the task from _running.
        previous = self._running.get(row["id"])
        claim_id = row["claim_id"]
        assert claim_id is not None  # a claim gives every row it returns a claim id
        self._claims[row["id"]] = claim_id
        runner = asyncio.create_task(self._run_task(row, previous), name=f"kaiju-task-{row['id']}")
        self._running[row["id"]] = runner
        runner.add_done_callback(functools.partial(self._done, row["id"], claim_id))

    def _done(self, task_id: str, claim_id: str, runner: asyncio.Task[None]) -> None:
        self._settling.discard(claim_id)
        if self._running.get(task_id) is runner:
            del self._running[task_id]
            self._claims.pop(task_id, None)
            self._revoked.discard(task_id)
        self._room_freed()


def claim_ahead(
    prefetch: int, concurrency: int, claim_s: float | None, call_s: float | None
) -> int:
    """How many tasks an executor claims ahead of free slots, at most ``prefetch``.

    As many as its slots are expected to free while one claim is out (``concurrency`` x claim
    time / call time), plus one: enough that a freed slot finds a task waiting, not more, so
    that executors sharing a queue do not hold tasks they cannot start soon. Until both times
    (seconds, moving averages) are measured, ``min(prefetch, concurrency)``.
    """
    if claim_s is None or call_s is None:
        return min(prefetch, concurrency)
    return min(prefetch, 1 + math.ceil(concurrency * claim_s / max(call_s, 1e-6)))
