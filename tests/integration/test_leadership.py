"""Leadership over a connection that stops answering (a network cut leaves it half-open).

A TCP proxy between the leader and PostgreSQL is frozen: it keeps both sockets open and
forwards nothing, as a silent network does. The leader must notice within its check timeout
and step down rather than go on leading on a lock it can no longer prove it holds.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import pytest

from kaiju_tasks import errors
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import FrozenClock
from tests.proxy import FreezableProxy


async def test_a_leader_whose_connection_goes_silent_steps_down(
    dsn: str, proxy_dsn: tuple[str, FreezableProxy]
) -> None:
    via_proxy, proxy = proxy_dsn
    leader = postgres.AdvisoryLeadership(via_proxy, check_timeout=0.5)
    standby = postgres.AdvisoryLeadership(dsn)
    try:
        assert await leader.hold()
        assert not await standby.hold()
        proxy.freeze()  # the network goes silent: nothing is closed, nothing arrives
        # It steps down once its check times out (0.5 s), instead of waiting on the silent
        # socket for as long as the network stays silent; 10 s leaves a slow machine room.
        started = asyncio.get_running_loop().time()
        assert not await leader.hold()
        assert asyncio.get_running_loop().time() - started < 10
        # Once the server drops the dead session (its keepalive probes do that; here the
        # proxy is closed), the lock is released and the standby takes over.
        await proxy.close()
        deadline = asyncio.get_running_loop().time() + 10
        while not await standby.hold():
            assert asyncio.get_running_loop().time() < deadline, "the lock was never released"
            await asyncio.sleep(0.1)
    finally:
        await leader.release()
        await standby.release()


async def test_the_lock_session_asks_the_server_to_probe_it(dsn: str) -> None:
    parts = urlsplit(dsn)
    if not parts.hostname or parts.hostname.startswith("/"):
        pytest.skip("keepalive settings apply to TCP connections only")
    leader = postgres.AdvisoryLeadership(dsn)
    try:
        assert await leader.hold()
        connection = leader._connection
        assert connection is not None
        assert await connection.fetchval("SHOW tcp_keepalives_idle") == "5"
        assert await connection.fetchval("SHOW tcp_keepalives_count") == "3"
        assert await connection.fetchval("SHOW tcp_user_timeout") == "10000"  # ms
    finally:
        await leader.release()


async def test_the_leaders_duties_run_in_the_session_that_holds_the_lock(
    dsn: str, proxy_dsn: tuple[str, FreezableProxy], store: postgres.PostgresEngineStore
) -> None:
    via_proxy, proxy = proxy_dsn
    leader = postgres.AdvisoryLeadership(via_proxy, check_timeout=0.5)
    fenced = leader.fenced(store)
    now = FrozenClock().now()
    with pytest.raises(errors.StoreError):  # not the leader: the duty runs nowhere
        await fenced.requeue_suspended(now=now, limit=10)
    try:
        assert await leader.hold()
        assert await fenced.requeue_suspended(now=now, limit=10) == 0
        connection = leader._connection
        assert connection is not None
        holder = connection.get_server_pid()
        last = await store.pool.fetchval(
            "SELECT query FROM pg_stat_activity WHERE pid = $1", holder
        )
        assert "SUSPENDED" in last  # the duty ran in the session holding the lock
        proxy.freeze()
        assert not await leader.hold()  # stepped down: its duties stop with it
        with pytest.raises(errors.StoreError):
            await fenced.requeue_suspended(now=now, limit=10)
    finally:
        await leader.release()


async def test_a_leader_whose_connection_is_left_mid_operation_steps_down(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seen in the chaos suite as the server shut down: asyncpg's "cannot switch to state 12;
    # another operation (2) is in progress" reached the manager as a traceback.
    import asyncpg

    leader = postgres.AdvisoryLeadership(dsn)
    standby = postgres.AdvisoryLeadership(dsn)
    try:
        assert await leader.hold()
        broken = leader._connection
        assert broken is not None

        fetchval = asyncpg.Connection.fetchval

        async def mid_operation(self: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
            if self is broken:
                raise asyncpg.InternalClientError(
                    "cannot switch to state 12; another operation (2) is in progress"
                )
            return await fetchval(self, *args, **kwargs)

        monkeypatch.setattr(asyncpg.Connection, "fetchval", mid_operation)
        assert not await leader.hold()  # stepped down, no exception
        assert broken.is_closed()  # and the session, with its lock, is gone
        assert await standby.hold()
    finally:
        await leader.release()
        await standby.release()
