"""Helpers shared by the orchestrator (bench/run.py) and the worker processes (bench/worker.py)."""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

# Worker modes: what the handlers do and what the worker reports.
NOOP = "noop"  # one no-op job per task; DONE when `expect` jobs ran
LATENCY = "latency"  # the handler reports now - t0 (t0 = wall time just before create)
PIPELINE = "pipeline"  # 3 chained stages; DONE when `expect` final stages ran
# The same two over HTTP: every stage is a JSON-RPC call to bench/service.py (scenarios e, f).
REMOTE = "remote"  # as NOOP, the stage being a `noop` call
REMOTE_PIPELINE = "remote-pipeline"  # as PIPELINE, each stage a `step` call
MODES = (NOOP, LATENCY, PIPELINE, REMOTE, REMOTE_PIPELINE)

PIPELINE_STAGES = 3


def with_database(dsn: str, database: str) -> str:
    """Return ``dsn`` pointing at ``database``."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


async def recreate_database(admin_dsn: str, database: str) -> str:
    """Drop (forcibly) and create ``database``; return its DSN."""
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{database}"')
    finally:
        await connection.close()
    return with_database(admin_dsn, database)


async def drop_database(admin_dsn: str, database: str) -> None:
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    finally:
        await connection.close()


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (``p`` in 0..100) of ``values``."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Reporter:
    """Worker-side: counts handler runs and reports to the orchestrator on stdout.

    Protocol (one line each): ``READY <wall time>`` when the worker is about to start consuming,
    ``LAT <seconds>`` for every latency sample, ``DONE <wall time>`` when ``expect`` final
    handler runs have happened (the database may commit the last ones a moment later), and
    ``STAT <json>`` for optional diagnostics at shutdown.
    """

    def __init__(self, mode: str, expect: int) -> None:
        self.mode = mode
        self.expect = expect
        self.count = 0

    @staticmethod
    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def ready(self) -> None:
        self.emit(f"READY {time.time():.6f}")

    def latency(self, t0: float) -> None:
        self.emit(f"LAT {time.time() - t0:.6f}")

    def final(self) -> None:
        """A task/job/pipeline completed its last handler."""
        self.count += 1
        if self.count == self.expect:
            self.emit(f"DONE {time.time():.6f}")


def is_pipeline(mode: str) -> bool:
    return mode in (PIPELINE, REMOTE_PIPELINE)


class RpcClient:
    """A peer handler's JSON-RPC call over HTTP, as one would write it by hand.

    One ``aiohttp.ClientSession`` per worker process (its default connector: keep-alive, at most
    100 connections), the request built as a dict and sent with ``json=``, the reply read with
    ``response.json()``. The request is the one kaiju-tasks sends for the same stage:
    ``{"jsonrpc": "2.0", "method": ..., "params": ..., "id": ...}``, ``params`` left out when
    there are none.
    """

    def __init__(self, url: str) -> None:
        import aiohttp

        self.url = url
        self.session = aiohttp.ClientSession()
        self._ids = itertools.count(1)

    async def call(self, method: str, params: Any = None) -> Any:
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": next(self._ids)}
        if params is not None:
            body["params"] = params
        async with self.session.post(self.url, json=body) as response:
            response.raise_for_status()
            reply = await response.json()
        if reply.get("error") is not None:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    async def close(self) -> None:
        await self.session.close()


class System(Protocol):
    """Orchestrator-side adapter of one system (kaiju-tasks or a peer)."""

    name: str
    database: str

    async def install(self, dsn: str) -> None:
        """Install the schema with the system's own tool."""

    async def open(self, dsn: str) -> None:
        """Open the producer's connection(s)."""

    async def close(self) -> None: ...

    async def enqueue_noop(self, n: int) -> None:
        """Bulk-enqueue ``n`` no-op jobs with the system's idiomatic bulk API."""

    async def enqueue_latency(self, t0: float) -> None:
        """Enqueue one no-op job carrying ``t0``; the handler reports ``now - t0``."""

    async def enqueue_pipelines(self, n: int) -> None:
        """Enqueue ``n`` 3-stage pipelines (their first stage)."""

    def done_query(self, mode: str) -> tuple[str, int]:
        """SQL counting completed units, and the multiplier of ``n`` it must reach."""
        ...
