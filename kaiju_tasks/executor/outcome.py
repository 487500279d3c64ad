"""How a run ends: the executor's writes of a task's outcome, shared by its tasks (group commit).

A stage's result, the task's finish, its wait at a Timer or Message, its failure (with the retry
the store decides) and a hand-back are each one guarded write: it applies only while the run's
claim id is current, and it is tried again while the database is out of reach. Writes of many
tasks share statements through :mod:`kaiju_tasks.batch`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar

from kaiju_tasks import batch, cron, errors, logs, models, retry, task_error, tracing
from kaiju_tasks import clock as clock_
from kaiju_tasks import methods as methods_
from kaiju_tasks.rpc import protocol
from kaiju_tasks.store import base

# One logger for the whole executor: its records keep the name they always had.
logger = logging.getLogger("kaiju_tasks.executor")

T = TypeVar("T")

RETRY_MAX_DELAY = 2.0
"""Longest wait, in seconds, between two tries of a write or heartbeat the database failed."""


class Revoked(Exception):
    """The task was taken from this executor (cancelled, timed out, rescued)."""


class Outcomes:
    """The writes of :class:`kaiju_tasks.executor.Executor` that commit how its runs went."""

    # Set by Executor.__init__.
    store: base.EngineStore
    id: str
    clock: clock_.Clock
    _stopping: bool
    _outage: logs.Outage
    _record: batch.Batcher[set[str]]
    _finish_batch: batch.Batcher[set[str]]
    _wait_batch: batch.Batcher[set[str]]
    _fail_batch: batch.Batcher[list[base.FailedRow]]
    _release_batch: batch.Batcher[set[str]]

    # -- transitions --------------------------------------------------------------------------

    def _next_run(self, row: Mapping[str, Any]) -> str | None:
        if not row.get("cron"):
            return None
        return cron.next_fire(row["cron"], self.clock.now()).isoformat()

    async def _finish(
        self,
        row: Mapping[str, Any],
        stage: int,
        result: Any,
        *,
        append: bool,
        timing: Mapping[str, Any] | None = None,
    ) -> None:
        item = {
            "id": row["id"],
            "stage": stage,
            "result": result,
            "append": append,
            "next_run": self._next_run(row),
            "claim_id": row["claim_id"],
            **(timing or {}),
        }
        if not await self._write(functools.partial(self._finish_batch.submit, item)):
            raise Revoked
        logger.info(
            "Task finished",
            extra={"event": "task_finished", "task_id": row["id"], "job_id": row["job_id"]},
        )

    async def _wait(self, row: Mapping[str, Any], stage: int, until: datetime) -> None:
        item = {
            "id": row["id"],
            "stage": stage,
            "wait_deadline": until.isoformat(),
            "claim_id": row["claim_id"],
            "run": tracing.current_run(),  # the run that resumes it links to this one
        }
        if not await self._write(functools.partial(self._wait_batch.submit, item)):
            raise Revoked

    async def _fail(
        self,
        row: Mapping[str, Any],
        stage: int,
        exc: errors.StageError,
        timing: Mapping[str, Any] | None = None,
    ) -> None:
        rejected = isinstance(exc, errors.StageRejected)
        if (
            isinstance(exc, errors.StageRejected)
            and exc.requeue
            and row["requeues"] < models.MAX_REQUEUES
        ):
            reject_error = task_error.build(
                protocol.REJECTED, _cut(exc.message), stage=stage, reason="rejected"
            )
            rejected_item = {
                "id": row["id"],
                "stage": stage,
                "error": reject_error,
                "claim_id": row["claim_id"],
            }
            applied = await self._write(
                lambda: self.store.requeue_rejected(self.id, [rejected_item], now=self.clock.now())
            )
            if row["id"] not in applied:
                raise Revoked
            return
        timeout = isinstance(exc, errors.StageTimeout)
        if rejected:
            code = protocol.REJECTED
        elif isinstance(exc, errors.RemoteCallError):
            code = exc.code
        else:
            code = protocol.TIMEOUT if timeout else protocol.INTERNAL_ERROR
        error = task_error.build(
            code,
            _cut(exc.message),
            stage=stage,
            reason="timeout" if timeout else "rejected" if rejected else "error",
            data=exc.remote_data if isinstance(exc, errors.RemoteCallError) else None,
        )
        error = _storable(error)
        tracing.failed(tracing.current_span(), error["message"])  # the run's span
        failed = await self._write(
            functools.partial(
                self._fail_batch.submit,
                {
                    "id": row["id"],
                    "status": "EXECUTED",
                    "executor_id": self.id,
                    "stage": stage,
                    "error": error,
                    "exit_code": 130 if timeout else 1,
                    "retryable": exc.retryable,
                    "next_run": self._next_run(row),
                    "retry_at": _retry_at(row, self.clock.now()),
                    "rejected": rejected,
                    "claim_id": row["claim_id"],
                    "run": tracing.current_run(),  # a retry's run links to this one
                    **(timing or {}),
                },
            )
        )
        if failed is None:
            raise Revoked
        _log_failure(row, stage, exc, error["message"], failed["status"], timing, self.id)

    async def _write(self, submit: Callable[[], Awaitable[T]]) -> T:
        """Commit a run's write, trying again while the database is out of reach.

        The write is guarded by the run's claim id, so trying it again is safe: once the
        database is back it applies if the run is still this executor's. A retry that does not
        apply after a failure of unknown outcome means the earlier try committed or the run was
        taken: either way the caller lets the task go (a stage whose record committed is left
        to the orphan sweep, which hands the task back at its next stage). Nothing is logged
        per write: the executor's outage line says the database is gone.
        """
        delay = 0.1
        while True:
            try:
                result = await submit()
            except errors.StoreError as exc:
                self._outage.failed(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)
                continue
            self._outage.ok()
            return result

    # -- batched writes (group commit across this executor's tasks) ---------------------------

    async def _record_stages(self, items: list[dict[str, Any]]) -> set[str]:
        return await self.store.record_stages(self.id, items, now=self.clock.now())

    async def _finish_tasks(self, items: list[dict[str, Any]]) -> set[str]:
        return await self.store.finish_tasks(self.id, items, now=self.clock.now())

    async def _wait_tasks(self, items: list[dict[str, Any]]) -> set[str]:
        return await self.store.wait_tasks(self.id, items, now=self.clock.now())

    async def _fail_tasks(self, items: list[dict[str, Any]]) -> list[base.FailedRow]:
        return await self.store.fail_tasks(items, now=self.clock.now())

    async def _release(self, row: Mapping[str, Any]) -> bool:
        """Hand back a task claimed ahead whose stage has not started; return whether it applied.

        It is queued again at once, in its place (see
        :meth:`kaiju_tasks.executor.pipeline.Pipeline._first_slot`).
        """
        item = {"id": row["id"], "claim_id": row["claim_id"]}
        applied: bool = await self._write(functools.partial(self._release_batch.submit, item))
        return applied

    async def _release_tasks(self, items: list[dict[str, Any]]) -> set[str]:
        released = await self.store.release_tasks(
            self.id, [item["claim_id"] for item in items], now=self.clock.now()
        )
        if released:
            logger.info(
                "Tasks claimed ahead handed back: %d (their stages got slower since the claim;"
                " an executor with free slots takes them)",
                len(released),
                extra={
                    "event": "prefetch_handed_back",
                    "executor_id": self.id,
                    "count": len(released),
                },
            )
        return released

    async def _hand_back(self, claim_id: str) -> None:
        delay = 0.1
        while True:
            try:
                await self.store.suspend_executor_tasks(self.id, [claim_id], now=self.clock.now())
                return
            except errors.StoreError:
                if self._stopping:
                    return  # the heartbeat stops, so the manager rescues the task
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)


MAX_ERROR_MESSAGE = 4000
"""Longest error message a stage stores and logs (characters); the rest is cut: a message may
quote what a stage or a called service answered."""


def _log_failure(
    row: Mapping[str, Any],
    stage: int,
    exc: errors.StageError,
    message: str,
    status: str,
    timing: Mapping[str, Any] | None,
    executor_id: str,
) -> None:
    """Log a stage's failure once, with the task's context as fields.

    An exception raised by an in-process method (a bug, not an answer) is an ERROR with its
    traceback; a failure that ends the task is a WARNING; one that will be retried is INFO.
    Error trackers (Sentry's and structlog's logging integrations) group them by these fields.

    Every field docs/monitoring.md lists is set here, ``executor_id`` included: the failure is
    written after the stage's task context (:mod:`kaiju_tasks.context`) was reset, so
    ``TaskContextFilter`` would find none, and it never overwrites a field the record has.
    """
    cause = exc.__cause__
    answers = (errors.KaijuTasksError, methods_.MethodError, methods_.Reject)  # not bugs
    internal = isinstance(cause, Exception) and not isinstance(cause, answers)
    pipeline = getattr(exc, "pipeline", False)
    fields = {
        "event": "pipeline_error" if pipeline else "stage_error" if internal else "stage_failed",
        "task_id": row["id"],
        "job_id": row["job_id"],
        "app": row["app_name"],
        "stage": stage,
        "method": (timing or {}).get("method") or _method_of(row, stage),
        "status": status,
        "retries": row.get("retries"),
        "error": message,
        "executor_id": executor_id,
    }
    if internal:
        message = "Task pipeline failed" if pipeline else "Stage method raised"
        logger.error(message, exc_info=cause, extra=fields)
    else:
        logger.log(
            logging.INFO if status != "FAILED" else logging.WARNING, "Stage failed", extra=fields
        )


def _method_of(row: Mapping[str, Any], stage: int) -> str | None:
    commands = row.get("commands") or ()
    if 0 <= stage < len(commands) and isinstance(commands[stage], Mapping):
        method = commands[stage].get("method")
        return method[:256] if isinstance(method, str) else None
    return None


def _cut(message: str) -> str:
    if len(message) <= MAX_ERROR_MESSAGE:
        return message
    return f"{message[:MAX_ERROR_MESSAGE]}... ({len(message) - MAX_ERROR_MESSAGE:,} characters cut)"


def _storable(value: Any) -> Any:
    """``value`` with each NUL character replaced by a backslash and a zero, to be storable."""
    if isinstance(value, str):
        return value.replace("\x00", "\\0")
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value


def _retry_at(row: Mapping[str, Any], now: datetime) -> str:
    """When a retry after a delay would run (the store applies it only to such a retry)."""
    return retry.next_attempt_at(row["retry_delay"], row["retries"], now).isoformat()
