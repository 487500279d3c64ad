"""A TCP proxy that can go silent, as a cut network does (tests of faults between hosts)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest


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


@contextlib.asynccontextmanager
async def proxied(dsn: str) -> AsyncIterator[tuple[str, FreezableProxy]]:
    """``dsn`` rewritten to pass through a new :class:`FreezableProxy`, and the proxy."""
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
