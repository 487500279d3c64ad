"""Helpers shared by the orchestrator (bench/run.py) and the worker processes (bench/worker.py)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import asyncpg

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

# Worker modes: what the handlers do and what the worker reports.
NOOP = "noop"  # one no-op job per task; DONE when `expect` jobs ran
LATENCY = "latency"  # the handler reports now - t0 (t0 = wall time just before create)
PIPELINE = "pipeline"  # 3 chained stages; DONE when `expect` final stages ran

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
