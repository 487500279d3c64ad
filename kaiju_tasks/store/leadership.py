"""Leadership of the managers: a session advisory lock on a dedicated connection.

One manager per database (and lock key) leads; its duties run on the lock's own session, so a
leader cut off from the database cannot act once the server has released its lock.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import ClassVar

import asyncpg

from kaiju_tasks.store import base, driver, locks, postgres

LEADER_LOCK_KEY = locks.LEADER_LOCK_KEY
GC_LOCK_KEY = locks.GC_LOCK_KEY


class AdvisoryLeadership(base.Leadership):
    """Leadership held as a session advisory lock on a dedicated connection.

    If the leader dies or its connection drops, PostgreSQL releases the lock and a standby's
    next ``hold()`` takes it. The leader's duties run in that same session (:meth:`fenced`):
    a leader cut off from the database cannot act once the server has released its lock,
    since a statement that reaches the server late finds its session gone.
    """

    CHECK_TIMEOUT = 5.0
    """Seconds the leader waits for its lock's connection to answer before it steps down."""

    KEEPALIVE: ClassVar[Mapping[str, str]] = {
        # The server probes the leader's connection after 5 s of silence, every 2 s, and drops
        # it (releasing the lock to a standby) after 3 unanswered probes or 10 s of unacked
        # data, instead of the operating system's default of about two hours: a leader cut
        # off by the network must not keep the lock. Unix sockets ignore these.
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "10000",
    }

    def __init__(
        self, dsn: str, key: int = locks.LEADER_LOCK_KEY, *, check_timeout: float | None = None
    ) -> None:
        self.dsn = dsn
        self.key = key
        self.check_timeout = self.CHECK_TIMEOUT if check_timeout is None else check_timeout
        self._connection: asyncpg.Connection | None = None

    async def hold(self) -> bool:
        """Take or keep the lock; False if another session holds it.

        The leader checks its connection at every call, within ``check_timeout``: a connection
        that stopped answering (a network cut leaves it half-open) is dropped and the manager
        steps down, rather than leading on a lock the server may already have released.
        """
        if self._connection is not None and not self._connection.is_closed():
            try:
                await self._connection.fetchval("SELECT 1", timeout=self.check_timeout)
                return True
            except Exception:  # noqa: BLE001 - whatever it is, the lock is no longer proven
                # A connection that hangs, was closed, or was left mid-operation by a duty
                # cancelled during its query ("another operation is in progress").
                self._connection.terminate()  # no goodbye on a connection that hangs
                self._connection = None
                return False  # step down now; the next call competes again
        with driver.translate():
            connection = await asyncpg.connect(
                self.dsn,
                timeout=self.check_timeout,
                server_settings={"application_name": "kaiju-tasks-leader", **self.KEEPALIVE},
            )
        try:
            with driver.translate():  # a server going away now is an outage, not a bug
                got = await connection.fetchval("SELECT pg_try_advisory_lock($1)", self.key)
                if got:
                    await driver.init_connection(connection)  # the duties' JSON codecs
        except BaseException:
            connection.terminate()  # it may be broken: closing could wait on it
            raise
        if not got:
            await connection.close()
            return False
        self._connection = connection
        return True

    def fenced(self, store: base.EngineStore) -> base.EngineStore:
        """A store over the lock's own session: its statements run only while the lock holds."""
        return postgres.PostgresEngineStore(_LockSession(self))

    async def release(self) -> None:
        """Close the lock's connection, which releases it."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None


class _LockSession:
    """The leadership's connection seen as a pool of one (what the store needs of a pool)."""

    def __init__(self, leadership: AdvisoryLeadership) -> None:
        self._leadership = leadership

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        connection = self._leadership._connection
        if connection is None or connection.is_closed():
            # Not the leader (any more): the duty is not run anywhere else.
            raise asyncpg.InterfaceError("the leadership's connection is closed")
        yield connection

    async def expire_connections(self) -> None:
        """Nothing to expire: the next ``hold()`` finds a lost connection and steps down."""
