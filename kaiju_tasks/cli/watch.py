"""The live views: ``events`` follows lifecycle events, ``top`` redraws the cluster's state."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from datetime import timedelta
from typing import Any

from kaiju_tasks import config, wiring
from kaiju_tasks.clock import SystemClock
from kaiju_tasks.store import migrate


def events(settings: config.Settings, args: argparse.Namespace) -> int:
    """Print one line per event until Ctrl-C, ``--limit`` or ``--timeout``."""
    from kaiju_tasks import monitor

    def wanted(event: monitor.Event) -> bool:
        if args.task and event.get("task_id") != args.task:
            return False
        return not (args.app and event.get("app_name") != args.app)

    async def show(receiver: monitor.EventReceiver) -> None:
        shown = 0  # --limit counts printed lines, not events filtered out
        async for event in receiver:
            if wanted(event):
                print(monitor.format_event(event, verbose=args.verbose), flush=True)
                shown += 1
                if args.limit is not None and shown >= args.limit:
                    return

    async def follow(dsn: str) -> None:
        await migrate.check_current(dsn)
        receiver = monitor.EventReceiver(dsn, after_id=0 if args.from_start else None)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        printing = asyncio.create_task(show(receiver))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait(
            [printing, stopped], return_when=asyncio.FIRST_COMPLETED, timeout=args.timeout
        )
        for pending in (printing, stopped):
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pending

    with wiring.database(settings) as dsn:
        asyncio.run(follow(dsn))
    return 0


TOP_UNSERVED = 10
"""Most apps ``top`` names in its warning about apps no live executor serves."""


def _top_view(snapshot: dict[str, Any], now: Any) -> Any:
    """Render a ``top`` snapshot as rich tables."""
    from datetime import datetime

    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from kaiju_tasks.insights import ALIVE_WITHIN, alive

    def ago(value: datetime | None) -> str:
        if not value:
            return ""
        seconds = (now - value).total_seconds()
        return f"{seconds:.0f}s ago" if seconds >= 0 else "now"

    workers = Table(title="executors", title_justify="left")
    for column in ("executor", "host", "apps", "running", "heartbeat", "state"):
        workers.add_column(column)
    for w in snapshot["workers"]:
        online = alive(w, alive_since=now - ALIVE_WITHIN)
        workers.add_row(
            w["id"],
            w["host"],
            ",".join(w["apps"]),
            f"{len(w['running'])}/{w['concurrency']}",
            ago(w["heartbeat_at"]),
            ("online" if online else "offline") + (" (debug)" if w.get("debug") else ""),
        )
    tasks = Table(title="running and waiting tasks", title_justify="left")
    for column in ("task", "app", "status", "stage", "executor", "since"):
        tasks.add_column(column)
    for t in snapshot["tasks"]:
        tasks.add_row(
            t["id"],
            t["app_name"],
            t["status"],
            f"{t['stage']}/{t['stages']}",  # counted from 0, as everywhere
            t["executor_id"] or "",
            ago(t["status_change"]),
        )
    counts = Table(title="tasks by app and status", title_justify="left")
    for column in ("app", "status", "count"):
        counts.add_column(column)
    for c in snapshot["counts"]:
        counts.add_row(c["app"], c["status"], str(c["count"]))
    queued = snapshot["queued"]
    lost = snapshot["unserved"]
    if not lost:
        return Group(workers, tasks, counts)
    named = ", ".join(f"{app} ({queued[app]} queued)" for app in lost[:TOP_UNSERVED])
    more = f" and {len(lost) - TOP_UNSERVED} more" if len(lost) > TOP_UNSERVED else ""
    warning = Text(
        f"no live executor serves {'app' if len(lost) == 1 else 'apps'} {named}{more}: "
        "their tasks wait, then fail at their deadline",
        style="bold yellow",
    )
    return Group(warning, workers, tasks, counts)


def top(settings: config.Settings, args: argparse.Namespace) -> int:
    """Refresh a view of the cluster every ``--interval`` seconds until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    clock = SystemClock()

    async def watch(dsn: str) -> None:
        from kaiju_tasks import insights

        async with wiring.engine_store(settings, dsn, "kaiju-tasks-cli") as store:
            reads = insights.Insights(store)

            async def view() -> Any:
                now = clock.now()
                snapshot = await reads.top(
                    now, heard_since=now - timedelta(minutes=10), limit=args.limit
                )
                return _top_view(snapshot, now)

            if args.once:
                Console(width=160).print(await view())
                return
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            with Live(await view(), auto_refresh=False) as live:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(args.interval):
                            await stop.wait()
                    live.update(await view(), refresh=True)

    with wiring.database(settings) as dsn:
        asyncio.run(watch(dsn))
    return 0
