"""LISTEN/NOTIFY channel names and the wake-up subscription.

A notification only wakes a loop early; every loop also polls, so a lost notification costs
latency, never correctness.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from kaiju_tasks import logs

logger = logging.getLogger(__name__)

QUEUED = "kaiju_tasks_queued"
"""Payload: an app name whose tasks were queued."""
CANCEL = "kaiju_tasks_cancel"
"""Payload: a task id whose running stage must be abandoned."""
EVENTS = "kaiju_tasks_events"
"""Payload: the newest id of events just written (read the rest from the events table)."""
MANAGER = "kaiju_tasks_manager"
"""Payload: empty; something for the manager to do now."""

Handler = Callable[[str], None]


class Listener:
    """Holds one connection that LISTENs on channels and calls handlers with payloads.

    If the connection drops, it reconnects in the background; meanwhile loops keep polling.
    """

    def __init__(
        self,
        dsn: str,
        handlers: dict[str, Handler],
        *,
        retry_interval: float = 1.0,
        name: str = "listener",
    ):
        self.dsn = dsn
        # One line when the connection is lost, reminders at growing intervals, one when back.
        self._outage = logs.Outage(logger, f"{name} listener")
        self.handlers = handlers
        self.retry_interval = retry_interval
        self._connection: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    async def start(self) -> None:
        """Connect and listen; returns once listening (or after the first failed attempt)."""
        self._task = asyncio.create_task(self._keep_listening(), name="kaiju-tasks-listener")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self.connected.wait()

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None

    def _dispatch(self, _connection: object, _pid: int, channel: str, payload: str) -> None:
        handler = self.handlers.get(channel)
        if handler is not None:
            try:
                handler(payload)
            except Exception:  # a failing handler must not break the connection
                logger.exception("Notification handler failed", extra={"event": "listen_error"})

    async def _keep_listening(self) -> None:
        while True:
            try:
                connection = await asyncpg.connect(
                    self.dsn, server_settings={"application_name": "kaiju-tasks-listener"}
                )
                self._connection = connection
                lost = asyncio.Event()
                connection.add_termination_listener(lambda _c, lost=lost: lost.set())
                for channel in self.handlers:
                    await connection.add_listener(channel, self._dispatch)
                self.connected.set()
                self._outage.ok()
                # Something may have happened while we were not listening.
                for handler in self.handlers.values():
                    handler("")
                await lost.wait()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._outage.failed(exc)
            else:
                self._outage.failed(ConnectionError("the connection was closed"))
            self.connected.clear()
            if self._connection is not None:
                with contextlib.suppress(Exception):
                    await self._connection.close()
                self._connection = None
            await asyncio.sleep(self.retry_interval)
