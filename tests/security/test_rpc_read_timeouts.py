"""Slow clients (slowloris): a connection slow to send its request head or body is closed.

The server runs exactly as ``kaiju-tasks server`` and ``run`` serve it (``rpc.server.runner``),
on loopback, with short timeouts; the bounds the tests wait with are many times larger.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kaiju_tasks.rpc import server as rpc_server

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
BOUND = 30.0  # seconds a test waits for the server to act: far above the timeouts


@pytest.fixture
async def served(make_api: Any) -> AsyncIterator[tuple[str, int]]:
    api = make_api(
        header_timeout=HEADER_TIMEOUT,
        body_timeout=BODY_TIMEOUT,
    )
    runner = rpc_server.runner(rpc_server.create_app(api))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield host, port
    finally:
        await runner.cleanup()


async def _trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        for byte in data:
            await asyncio.sleep(every)
            writer.write(bytes([byte]))
            await writer.drain()


async def _slow_connection(
    host: str, port: int, first: bytes, trickled: bytes, every: float = 0.3
) -> tuple[float, bytes]:
    """Send ``first`` then ``trickled`` a byte at a time; return (seconds until closed, reply)."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(host, port)
    started = loop.time()
    writer.write(first)
    trickling = asyncio.create_task(_trickle(writer, trickled, every))
    try:
        async with asyncio.timeout(BOUND):
            try:
                reply = await reader.read()  # until the server closes the connection
            except ConnectionResetError:
                # Closed too: a server that closes while bytes it has not read are still
                # arriving resets the connection (RST) instead of ending it (FIN).
                reply = b""
        return loop.time() - started, reply
    finally:
        trickling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trickling
        writer.close()


SLOW_HEAD = b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"  # 200+ bytes at 0.3 s each: over a minute


async def test_200_slow_header_connections_are_closed_while_health_keeps_answering(served):
    host, port = served
    slow = [
        asyncio.create_task(
            _slow_connection(host, port, b"POST /public/rpc HTTP/1.1\r\nHost: x\r\n", SLOW_HEAD)
        )
        for _ in range(200)
    ]
    answered = 0
    async with aiohttp.ClientSession() as session:
        while not all(task.done() for task in slow):
            async with session.get(f"http://{host}:{port}/health") as response:
                assert response.status == 200
                answered += 1
            await asyncio.sleep(0.05)
    closed_after = [task.result()[0] for task in slow]  # raises if one was never closed
    assert all(reply == b"" for _, reply in (task.result() for task in slow))
    assert answered > 0
    assert max(closed_after) < BOUND


async def test_a_connection_that_sends_nothing_is_closed(served):
    host, port = served
    closed_after, reply = await _slow_connection(host, port, b"", b"")
    assert reply == b""
    assert closed_after < BOUND


async def test_a_slow_head_after_a_first_response_on_the_same_connection_is_closed(served):
    host, port = served
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 200")
        started = loop.time()
        trickling = asyncio.create_task(_trickle(writer, b"GET /health HTTP/1.1\r\n" * 10, 0.3))
        async with asyncio.timeout(BOUND):
            while await reader.read(65536):  # the rest of the first reply, then EOF
                pass
        trickling.cancel()
        assert loop.time() - started < BOUND
    finally:
        writer.close()


async def test_a_slow_body_gets_408_and_the_connection_is_closed(served):
    host, port = served
    body = b'{"jsonrpc": "2.0", "id": 1, "method": "tasks.list"}'
    head = (
        b"POST /public/rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    closed_after, reply = await _slow_connection(host, port, head, body)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"body_timeout" in reply
    assert closed_after < BOUND


async def test_a_client_sending_at_a_normal_pace_is_answered(served):
    host, port = served
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(3):  # keep-alive: several requests on one connection
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            while (await reader.readline()) != b"\r\n":
                pass
            await reader.readexactly(len(b'{"database":true}'))
    finally:
        writer.close()
