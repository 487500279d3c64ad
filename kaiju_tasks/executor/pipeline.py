"""One task's run: its stages in order, as a pipeline.

For each stage: evaluate its condition, then do what its kind says (:mod:`kaiju_tasks.stages`):
park the task until a moment (Timer, Message: no slot taken), or render the method and params
from ``{id, kws, executor, "0", "1", ...}`` and call it, in-process or over HTTP, within the
stage's ``max_timeout`` and the task's ``exec_deadline``, in one of the executor's slots. Each
result is committed before the next stage starts (see :mod:`kaiju_tasks.executor.outcome`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import orjson

from kaiju_tasks import (
    conditions,
    context,
    errors,
    limits,
    notifications,
    redact,
    templates,
    tracing,
)
from kaiju_tasks import methods as methods_
from kaiju_tasks import stages as stage_kinds
from kaiju_tasks.executor import outcome
from kaiju_tasks.rpc import client as rpc_client
from kaiju_tasks.rpc import protocol
from kaiju_tasks.store import base

logger = outcome.logger

_NO_SLOT = contextlib.nullcontext()

HOLD_S = 1.0
"""How long (seconds) a run claimed ahead may wait for its first slot before it may be handed
back, if more runs wait than the executor now claims ahead (see :meth:`Pipeline._first_slot`)."""


class _Taken:
    """A slot already taken (by :meth:`Pipeline._first_slot`): given back on exit."""

    def __init__(self, slots: asyncio.Semaphore) -> None:
        self._slots = slots

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        self._slots.release()


class Pipeline(outcome.Outcomes):
    """How :class:`kaiju_tasks.executor.Executor` runs one claimed task."""

    # Set by Executor.__init__.
    methods: methods_.Methods
    app_urls: dict[str, str]
    client: rpc_client.Client
    data: dict[str, Any]
    _call_batches: dict[str, rpc_client.CallBatches]
    _slots: asyncio.Semaphore
    _call_s: float | None
    _settling: set[str]
    _revoked: set[str]
    _wake: asyncio.Event
    _backlog: bool
    _listener: notifications.Listener | None
    _claims: dict[str, str]
    _leased: Callable[[], Awaitable[None]]  # waits until the lease allows a stage call
    _in_call: set[str]  # task ids whose stage call is in flight (abandoned if the lease lapses)
    concurrency: int
    prefetch: int
    _stalled_s: float | None  # the call time the slots' pace shows, while slower than measured
    _waiting: dict[str, int]  # runs waiting for the slot of their first call: claim id -> seq
    _queued_runs: int  # the last seq given in _waiting
    _slot_starts: int  # calls that took a slot so far (for _behind's pace)
    _ahead: Callable[[], int]  # how many tasks the executor claims ahead (see Executor._ahead)

    # -- one task -----------------------------------------------------------------------------

    async def _run_task(
        self, row: base.TaskRow, previous: asyncio.Task[None] | None = None
    ) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        # The run's span covers its outcome too: a failure recorded below marks it.
        with tracing.run_span(row, self.id):
            await self._run_claimed(row)

    async def _run_claimed(self, row: base.TaskRow) -> None:
        task_id = row["id"]
        stage = row["stage"]
        at = [stage]  # the stage the pipeline is at: where a crash of it happened
        claim_id = row["claim_id"]
        assert claim_id is not None  # a claim gives every row it returns a claim id
        try:
            await self._pipeline(row, at)
        except errors.StoreError as exc:
            # The outcome of the last write is unknown: hand the task back so that the
            # manager re-queues it at the last committed stage (at-least-once per stage).
            logger.warning(
                "Database error, handing the task back",
                extra={
                    "event": "task_handed_back",
                    "task_id": task_id,
                    "job_id": row["job_id"],
                    "error": str(exc),
                },
            )
            await self._hand_back(claim_id)
        except outcome.Revoked:
            logger.info(
                "Task taken away",
                extra={
                    "event": "task_abandoned",
                    "task_id": task_id,
                    "job_id": row["job_id"],
                    "stage": stage,
                },
            )
        except asyncio.CancelledError:
            if task_id in self._revoked:
                logger.info(
                    "Stage abandoned",
                    extra={"event": "stage_abandoned", "task_id": task_id, "job_id": row["job_id"]},
                )
                return  # cancelled on purpose: the store already says what happened
            raise  # shutdown: stop() hands the task back
        except Exception as exc:  # noqa: BLE001 - logged with its traceback in _log_failure
            # Fail it rather than leave it EXECUTED: a hand-back would run it again, forever.
            # The failure is logged once, as an ERROR with this traceback (see _log_failure).
            failure = errors.StageError(
                f"internal error: {type(exc).__name__}: {redact.text(str(exc))}", retryable=False
            )
            failure.__cause__ = exc
            failure.pipeline = True  # type: ignore[attr-defined]  # not a method's: see _log_failure
            try:
                await self._fail(row, at[0], failure)
            except (errors.KaijuTasksError, outcome.Revoked):
                logger.exception(
                    "Task crashed the executor pipeline",
                    extra={
                        "event": "task_crashed",
                        "task_id": task_id,
                        "job_id": row["job_id"],
                        "app": row["app_name"],
                        "stage": at[0],
                        "method": outcome._method_of(row, at[0]),
                        "executor_id": self.id,
                    },
                )
                await self._hand_back(claim_id)

    async def _pipeline(self, row: base.TaskRow, at: list[int]) -> None:
        task_id = row["id"]
        commands: list[dict[str, Any]] = row["commands"]
        results: list[Any] = list(row["result"])
        # What the stored results already take, toward [limits] task_result_bytes.
        stored = len(orjson.dumps(results, option=orjson.OPT_NON_STR_KEYS)) if results else 2
        stage: int = row["stage"]
        stages = len(commands)
        first = True  # no slot taken yet by this run
        if stage >= stages:  # a Timer or Message was the last stage
            self._settle(row)
            await self._finish(row, stage, None, append=False)
            return
        while True:
            at[0] = stage
            command = commands[stage]
            kind = stage_kinds.of_stored(command)
            # What the stage called and how long it took, for the stage's event (metrics).
            meter: dict[str, Any] = {"method": None, "started": 0.0}
            result: Any = None
            parked: datetime | None = None  # a parking kind (Timer, Message): until then
            failure: errors.StageError | None = None
            # A slot is a stage call in flight, from the clock reading its deadline counts from
            # to its return. The writes that commit its outcome come after: the next call does
            # not wait for them (the next stage of this task does). Parking kinds take none,
            # nor do calls sent in batches (their batch requests are bounded instead).
            slot: contextlib.AbstractAsyncContextManager[Any] = (
                _NO_SLOT
                if kind.park is not None or self._batched_call(row, command)
                else self._slots
            )
            if first and slot is self._slots and self.prefetch and self._slots.locked():
                if not await self._first_slot(row):
                    return  # handed back: another executor may start it sooner
                slot = _Taken(self._slots)
            first = False
            async with slot:
                if slot is not _NO_SLOT:
                    self._slot_starts += 1
                if kind.park is None:
                    await self._leased()  # no call once the manager may have rescued the task
                    if self._claims.get(task_id) != row["claim_id"]:
                        raise outcome.Revoked  # rescued meanwhile, and claimed here anew
                now = self.clock.now()
                meter["started"] = asyncio.get_running_loop().time()
                data = self._template_data(row, results)
                token = context.current_task.set(
                    {
                        "task_id": task_id,
                        "job_id": row["job_id"],
                        "stage": stage,
                        "app_name": row["app_name"],
                        "executor_id": self.id,
                        "deadline": row["exec_deadline"],
                        "root_id": row["root_id"] or task_id,
                        "priority": row["priority"],
                    }
                )
                try:
                    condition = command.get("condition")
                    if condition is not None and not conditions.evaluate(condition, data, now=now):
                        pass  # skipped: its result is null
                    elif kind.park is not None:
                        parked = kind.park(row, command, now)
                    else:
                        with tracing.stage_span(row, self.id, stage, command["method"]) as span:
                            self._in_call.add(task_id)
                            try:
                                result = await self._call(row, stage, command, data, now, meter)
                                stored += _json_checked(result, stored)
                            except (errors.StageError, errors.ValidationError) as exc:
                                tracing.failed(span, exc.message)
                                raise
                            finally:  # how long calls take, for claim_ahead
                                self._in_call.discard(task_id)
                                elapsed = asyncio.get_running_loop().time() - meter["started"]
                                self._call_s = _averaged(self._call_s, elapsed)
                                self._stalled_s = None  # calls end again: measured anew
                except errors.StageError as exc:
                    failure = exc
                except errors.ValidationError as exc:  # a template or condition that cannot apply
                    failure = errors.StageError(exc.message, retryable=False)
                finally:
                    context.current_task.reset(token)
            if failure is not None:
                self._settle(row)
                await self._fail(row, stage, failure, _measured(meter))
                return
            if parked is not None:
                self._settle(row)
                await self._wait(row, stage, parked)
                return
            results.append(result)
            if stage + 1 == stages:
                self._settle(row)
                await self._finish(row, stage, result, append=True, timing=_measured(meter))
                return
            item = {
                "id": task_id,
                "stage": stage,
                "result": result,
                "claim_id": row["claim_id"],
                **_measured(meter),
            }
            # Between stages the run needs no slot: while its result is written, a claimed
            # task may use the room (the run takes a slot again for its next call).
            self._settle(row)
            try:
                if not await self._write(functools.partial(self._record.submit, item)):
                    raise outcome.Revoked
            finally:
                self._settling.discard(item["claim_id"])
            stage += 1

    async def _first_slot(self, row: base.TaskRow) -> bool:
        """Take a slot for a run's first call; return False if the run was handed back instead.

        A run claimed ahead waits here for a slot, in turn. The executor claims ahead as many
        tasks as its slots start during one claim, by the call time it measured; if the calls
        got slower since (a queue of fast stages, then slow ones), more runs wait than it
        would claim now. Every ``HOLD_S`` of waiting, a run checks: if the slots started
        calls at less than half the measured pace meanwhile, and more runs wait before it than
        the executor would claim ahead at that pace, it goes back to the queue, in its place,
        for an executor with free slots, instead of waiting here behind the slow calls (its
        deadline running). Claims are sized by that pace too, until a call ends.
        """
        claim_id = row["claim_id"]
        assert claim_id is not None
        self._queued_runs += 1
        seq = self._queued_runs
        self._waiting[claim_id] = seq
        # One acquire for the whole wait, so that the run keeps its turn across the checks.
        taking = asyncio.ensure_future(self._slots.acquire())
        try:
            while True:
                started = self._slot_starts
                done, _ = await asyncio.wait({taking}, timeout=HOLD_S)
                if done:
                    taking.result()
                    return True
                if self._behind(seq, self._slot_starts - started):
                    break
        except BaseException:
            self._drop_acquire(taking)
            raise
        finally:
            del self._waiting[claim_id]
        self._drop_acquire(taking)
        self._settle(row)
        await self._release(row)
        return False

    def _drop_acquire(self, taking: asyncio.Future[Any]) -> None:
        """Give up a slot acquire: cancel it, or give back the slot it already took."""
        if not taking.done():
            taking.cancel()  # a slot granted meanwhile is passed on by the semaphore
        elif not taking.cancelled() and taking.exception() is None:
            self._slots.release()

    def _behind(self, seq: int, started: int) -> bool:
        """Whether a waiting run (``seq``) should go back to the queue.

        ``started``: the calls that took a slot during the run's last ``HOLD_S`` of waiting.
        Only when the slots went at less than half the measured pace (calls that have not
        ended are not measured yet): then claims are sized by that pace (see ``_ahead``), and
        the runs waiting beyond what the executor would claim ahead at it go back.
        """
        paced = self.concurrency * HOLD_S / max(started, 1)
        if paced <= 2 * (self._call_s or 0.0):
            return False  # the slots go about as fast as measured: its turn comes
        self._stalled_s = paced
        keep = max(1, self._ahead())
        # _waiting is in seq order: the run is behind if the keep-th entry is not after it.
        kept_last = next(itertools.islice(self._waiting.values(), keep, None), None)
        return kept_last is not None and kept_last <= seq

    def _batched_call(self, row: Mapping[str, Any], command: Mapping[str, Any]) -> bool:
        """Whether the stage's call goes out in a batch request of its app (``[apps] batch=N``).

        Such a call takes no slot: its app's :class:`~kaiju_tasks.rpc.client.CallBatches` has
        at most ``concurrency`` requests in flight, each of up to N calls. A method written as
        a template is not known until rendered: its call takes a slot, as any other.
        """
        method = command.get("method")
        return (
            row["app_name"] in self._call_batches
            and isinstance(method, str)
            and method not in self.methods
            and not templates.is_template(method)
            and not templates.is_literal(method)
        )

    def _settle(self, row: Mapping[str, Any]) -> None:
        """The run needs no slot while an outcome is written: room for a claim.

        After its last call, or between two stages (it takes a slot again for its next call).
        """
        self._settling.add(row["claim_id"])
        self._room_freed()

    def _room_freed(self) -> None:
        """A run needs its slot no more, or has ended: claim again if more may be queued.

        Only if the last claim was full: when it came back short, the queue was empty, and
        whatever is queued later wakes this executor by notification (without a listener,
        every freed room wakes it).
        """
        if self._backlog or self._listener is None:
            self._wake.set()

    def _template_data(self, row: Mapping[str, Any], results: Sequence[Any]) -> dict[str, Any]:
        data: dict[str, Any] = {"id": row["id"], "kws": row["kws"], "executor": self.data}
        for index, value in enumerate(results):
            data[str(index)] = value
        return data

    async def _call(
        self,
        row: Mapping[str, Any],
        stage: int,
        command: Mapping[str, Any],
        data: Mapping[str, Any],
        now: datetime,
        meter: dict[str, Any],
    ) -> Any:
        written = command["method"]
        method = (  # most methods are plain names: nothing to render
            templates.render(written, data, now=now)
            if templates.is_template(written) or templates.is_literal(written)
            else written
        )
        meter["method"] = written  # as written: a template's source, never user data
        if not isinstance(method, str) or not method:
            raise errors.StageError(
                f"method template rendered to {method!r}, not a method name", retryable=False
            )
        params = command.get("params")
        if params is not None:
            params = templates.render(params, data, now=now)
        deadline, limit_name = stage_kinds.stage_deadline(row, command, now)
        timeout = (deadline - now).total_seconds()
        if timeout <= 0:
            raise errors.StageTimeout(f"{limit_name} exceeded before stage {stage} started")
        request_id = f"{row['id']}:{row['job_id']}:{stage}:{row['retries']}"
        try:
            async with asyncio.timeout(timeout):
                if method in self.methods:
                    return await self.methods.call(method, params)
                url = self.app_urls.get(row["app_name"])
                if url is None:
                    raise errors.RemoteCallError(
                        f"method {method!r} not found: it is not registered here and app "
                        f"{row['app_name']!r} has no URL",
                        code=protocol.METHOD_NOT_FOUND,
                        retryable=False,
                    )
                batches = self._call_batches.get(row["app_name"])
                if batches is not None:
                    return await batches.call(
                        method,
                        params,
                        request_id=request_id,
                        deadline=deadline,
                        seconds_left=timeout,
                    )
                return await self.client.call(
                    url,
                    method,
                    params,
                    request_id=request_id,
                    correlation_id=row["job_id"],
                    deadline=deadline,
                    seconds_left=timeout,
                )
        except TimeoutError:
            raise errors.StageTimeout(f"{limit_name} exceeded") from None
        except errors.StageError:
            raise
        except Exception as exc:
            # Logged once, with its traceback, when the failure is recorded (see _fail).
            raise errors.RemoteCallError(
                f"{type(exc).__name__}: {redact.text(str(exc))}", code=protocol.INTERNAL_ERROR
            ) from exc


_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")  # an escaped NUL, not an escaped backslash


def _json_checked(result: Any, stored: int) -> int:
    """Refuse a stage result that is not storable JSON or is too large; return its size.

    The size is in bytes of JSON; a result that is not JSON would fail every write.

    ``stored`` is the size of the task's results so far, toward ``[limits] task_result_bytes``.
    """
    try:
        dumped = orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS)
    except TypeError as exc:
        raise errors.StageError(
            f"the stage returned a value that is not JSON: {exc}", retryable=False
        ) from None
    bounds = limits.active()
    if len(dumped) > bounds.stage_result_bytes:
        raise errors.StageError(
            f"the stage result is {len(dumped):,} bytes of JSON, more than stage_result_bytes"
            f" ({limits.describe(bounds.stage_result_bytes)})",
            retryable=False,
        )
    if stored + len(dumped) + 1 > bounds.task_result_bytes:
        raise errors.StageError(
            f"the task's results would take {stored + len(dumped) + 1:,} bytes of JSON, more"
            f" than task_result_bytes ({limits.describe(bounds.task_result_bytes)})",
            retryable=False,
        )
    if _NUL.search(dumped):  # PostgreSQL jsonb cannot hold NUL characters
        raise errors.StageError(
            "the stage returned text with NUL characters, which cannot be stored",
            retryable=False,
        )
    return len(dumped) + 1


def _averaged(average: float | None, sample: float) -> float:
    """An exponential moving average that follows a change within a few dozen samples."""
    return sample if average is None else average + (sample - average) / 16


def _measured(meter: Mapping[str, Any]) -> dict[str, Any]:
    """The ``method`` and ``duration_s`` of a stage that just ended."""
    elapsed = asyncio.get_running_loop().time() - meter["started"]
    return {"method": meter["method"], "duration_s": round(elapsed, 6)}
