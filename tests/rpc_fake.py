"""A JSON-RPC target for the tests: an aiohttp app that records every call and answers it.

The transport (single calls and batches, recording, concurrency bookkeeping, latency) lives here
once; what a test's application does lives in its ``answer(call)`` function, which returns the
result, raises :class:`Fault` for a JSON-RPC error, returns :data:`NO_REPLY` to leave a call
unanswered, or raises an ``aiohttp.web.HTTPException`` to fail the whole request.

Tests get one through the ``rpc_target`` fixture (on pytest-aiohttp's ``aiohttp_server``);
processes of their own (the chaos tests) start one with :func:`running`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

NO_REPLY: Any = object()
"""What ``answer`` returns for a call that gets no reply (a batch then lacks its entry)."""


class Fault(Exception):
    """Raised by ``answer``: the call gets a JSON-RPC error object with these fields."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@dataclasses.dataclass(frozen=True)
class Call:
    """One JSON-RPC call as the target received it."""

    method: str
    params: Any
    id: Any
    headers: Mapping[str, str]
    peer: str
    at: float  # time.monotonic() on arrival

    @property
    def task_id(self) -> str:
        """The task of an executor's request id (``task:job:stage:retries``)."""
        return str(self.id).rsplit(":", 3)[0]


Answer = Callable[[Call], Any]  # a result, or an awaitable of one


def echo(call: Call) -> Any:
    """The default answer: the call's params."""
    return call.params


class RpcTarget:
    """A JSON-RPC app that records calls (in :attr:`calls`, in arrival order) and answers them.

    Args:
        answer: the application: ``answer(call)``, plain or async (default: echo the params).
        path: where it answers POSTs.
        delay: seconds every request waits before it is answered (latency, so calls overlap).
    """

    def __init__(self, answer: Answer = echo, *, path: str = "/rpc", delay: float = 0.0) -> None:
        self.answer = answer
        self.path = path
        self.delay = delay
        self.url = ""
        self.port = 0
        self.calls: list[Call] = []
        self.requests = 0
        self.batch_sizes: list[int] = []  # one entry per batch request
        self.done_at: list[float] = []  # time.monotonic() of each answered call
        self.in_flight: Counter[str] = Counter()  # calls being answered now, by task
        self.max_in_flight: Counter[str] = Counter()  # the most at once, by task
        self.open_requests = 0  # HTTP requests being answered now
        self.max_open_requests = 0  # the most at once
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(self.path, self.handle)
        return app

    def called(self, method: str) -> list[Call]:
        """The calls of ``method``, in arrival order."""
        return [c for c in self.calls if c.method == method]

    def methods(self) -> list[str]:
        """The method of every call, in arrival order."""
        return [c.method for c in self.calls]

    def count_by_id(self) -> Counter[Any]:
        """How many times each request id was called."""
        return Counter(c.id for c in self.calls)

    def twice(self) -> dict[Any, int]:
        """Request ids called more than once."""
        return {rid: n for rid, n in self.count_by_id().items() if n > 1}

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        self.open_requests += 1
        self.max_open_requests = max(self.max_open_requests, self.open_requests)
        try:
            return await self._handle(request)
        finally:
            self.open_requests -= 1

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        headers = CIMultiDict(request.headers)
        items = body if isinstance(body, list) else [body]
        if isinstance(body, list):
            self.batch_sizes.append(len(body))
        calls = [
            Call(
                method=item.get("method"),
                params=item.get("params"),
                id=item.get("id"),
                headers=headers,
                peer=request.remote or "",
                at=time.monotonic(),
            )
            for item in items
        ]
        self.calls += calls
        for call in calls:
            self.in_flight[call.task_id] += 1
            self.max_in_flight[call.task_id] = max(
                self.max_in_flight[call.task_id], self.in_flight[call.task_id]
            )
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            replies = [await self._reply(call) for call in calls]
        finally:
            for call in calls:
                self.in_flight[call.task_id] -= 1
                if not self.in_flight[call.task_id]:
                    del self.in_flight[call.task_id]
        answered = [r for r in replies if r is not NO_REPLY]
        if isinstance(body, list):
            return web.json_response(answered)
        return web.json_response(answered[0] if answered else None)

    async def _reply(self, call: Call) -> Any:
        try:
            result = self.answer(call)
            if inspect.isawaitable(result):
                result = await result
        except Fault as fault:
            reply: Any = {"jsonrpc": "2.0", "id": call.id, "error": fault.error()}
        else:
            if result is NO_REPLY:
                return NO_REPLY
            reply = {"jsonrpc": "2.0", "id": call.id, "result": result}
        self.done_at.append(time.monotonic())
        return reply

    async def start(self, host: str = "127.0.0.1") -> None:
        """Listen on ``host`` (``0.0.0.0`` for network namespaces to reach it), any free port."""
        self._runner = web.AppRunner(self.app())
        await self._runner.setup()
        await web.TCPSite(self._runner, host, 0).start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}{self.path}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def running(
    answer: Answer = echo, *, delay: float = 0.0, host: str = "127.0.0.1"
) -> AsyncIterator[RpcTarget]:
    """A started :class:`RpcTarget` listening on ``host``, closed on exit."""
    target = RpcTarget(answer, delay=delay)
    await target.start(host)
    try:
        yield target
    finally:
        await target.close()
