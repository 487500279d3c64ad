"""Leadership over a connection that stops answering (a network cut leaves it half-open).

A TCP proxy between the leader and PostgreSQL is frozen: it keeps both sockets open and
forwards nothing, as a silent network does. The leader must notice within its check timeout
and step down rather than go on leading on a lock it can no longer prove it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from kaiju_tasks import errors
from kaiju_tasks.store import postgres
from kaiju_tasks.testing import FrozenClock


class FreezableProxy:
    """Forwards TCP to ``upstream``; ``freeze()`` stops forwarding without closing anything."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.server: asyncio.Server | None = None
        self.pumps: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self.writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pump = asyncio.create_task(self._pump(source, sink))
            self.pumps.add(pump)
            pump.add_done_callback(self.pumps.discard)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                await self.flowing.wait()
                sink.write(data)
                await sink.drain()
            await self.flowing.wait()
            sink.close()  # one side closed: so does the other (asyncpg's cancel waits for it)

    def freeze(self) -> None:
        self.flowing.clear()

    async def close(self) -> None:
        for pump in list(self.pumps):
            pump.cancel()
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def proxy_dsn(dsn: str) -> AsyncIterator[tuple[str, FreezableProxy]]:
    parts = urlsplit(dsn)
    if not parts.hostname or parts.hostname.startswith("/") or parts.port is None:
        pytest.skip("needs PostgreSQL over TCP (the embedded server listens on a Unix socket)")
    proxy = FreezableProxy(parts.hostname, parts.port)
    port = await proxy.start()
    netloc = parts.netloc.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{port}")
    try:
        yield urlunsplit(parts._replace(netloc=netloc)), proxy
    finally:
        await proxy.close()


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
        # It steps down once its check times out, instead of waiting on the silent socket
        # (which, without the timeout, would be for as long as the network stays silent).
        assert not await leader.hold()
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
