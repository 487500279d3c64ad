"""The remote service of scenarios e and f: ``python -m bench.service [--port 0]``.

A separate aiohttp process answering JSON-RPC 2.0 on ``POST /``, single requests and batches:

- ``noop`` (any params) -> ``null``
- ``step`` with ``{"x": n}`` (or ``[n]``) -> ``{"x": n + 1}``

Every system's stages (kaiju-tasks: the app's URL; peers: their handlers) call this one
service, so what it costs is the same for all of them. It counts the *final* calls of a unit of
work (every ``noop``; a ``step`` with ``x == 3``, the last stage of a pipeline) and tells the
orchestrator on stdout when the count it was given is reached, so that the orchestrator polls the
database fast only at the end (as it does with the worker's own ``DONE`` in b and d).

Control (not JSON-RPC, used by bench/run.py only): ``POST /control {"expect": N}`` resets the
counters and arms ``DONE`` for N final calls; ``GET /stats`` returns the counters.

Stdout: ``READY <port>`` once listening, ``DONE <wall time>`` when ``expect`` final calls came.
Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from typing import Any

import orjson
from aiohttp import web

PIPELINE_STAGES = 3  # as bench.common; not imported, to keep this process's imports small

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Service:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.expect = 0
        self.final = 0
        self.calls = 0
        self.requests = 0
        self.batches = 0

    # -- JSON-RPC ------------------------------------------------------------------------------

    def _count_final(self) -> None:
        self.final += 1
        if self.final == self.expect:
            emit(f"DONE {time.time():.6f}")

    def answer(self, item: Any) -> dict[str, Any] | None:
        """The reply to one request object (None for a notification)."""
        if not isinstance(item, dict) or item.get("jsonrpc") != "2.0":
            return _error(None, INVALID_REQUEST, "invalid request")
        request_id = item.get("id")
        method = item.get("method")
        params = item.get("params")
        self.calls += 1
        result: Any
        if method == "noop":
            result = None
            self._count_final()
        elif method == "step":
            x = params.get("x") if isinstance(params, dict) else None
            if x is None and isinstance(params, list) and params:
                x = params[0]
            if not isinstance(x, int):
                return _error(request_id, INVALID_PARAMS, "step takes an integer x")
            result = {"x": x + 1}
            if x == PIPELINE_STAGES:
                self._count_final()
        else:
            return _error(request_id, METHOD_NOT_FOUND, f"method {method!r} not found")
        if "id" not in item:
            return None  # a notification: no reply
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    async def rpc(self, request: web.Request) -> web.Response:
        self.requests += 1
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _json(_error(None, PARSE_ERROR, "parse error"))
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(body, list):
            self.batches += 1
            if not body:
                return _json(_error(None, INVALID_REQUEST, "empty batch"))
            replies = [reply for item in body if (reply := self.answer(item)) is not None]
            if not replies:
                return web.Response(status=204)
            return _json(replies)
        reply = self.answer(body)
        if reply is None:
            return web.Response(status=204)
        return _json(reply)

    # -- control -------------------------------------------------------------------------------

    async def control(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.expect = int(body.get("expect", 0))
        self.final = self.calls = self.requests = self.batches = 0
        return _json({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        return _json(
            {
                "expect": self.expect,
                "final": self.final,
                "calls": self.calls,
                "requests": self.requests,
                "batches": self.batches,
            }
        )


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _json(body: Any) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def serve(host: str, port: int, delay: float) -> None:
    service = Service(delay)
    app = web.Application()
    app.router.add_post("/", service.rpc)
    app.router.add_post("/control", service.control)
    app.router.add_get("/stats", service.stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    server = site._server  # the bound port, when asked for port 0
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    emit(f"READY {bound}")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed on READY)")
    parser.add_argument(
        "--delay-ms", type=float, default=0.0, help="wait this long before answering a request"
    )
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.delay_ms / 1000))


if __name__ == "__main__":
    main()
