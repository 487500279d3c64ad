"""One worker process of one system: ``python -m bench.worker SYSTEM --dsn ... --mode ...``.

Started by bench/run.py in its own process (and session). Reports on stdout (see
``common.Reporter``); stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common

WorkerFn = Callable[..., Awaitable[None]]


def _load(system: str) -> WorkerFn:
    if system == "kaiju":
        from bench import kaiju

        return kaiju.run_worker
    if system == "pgqueuer":
        from bench.peers import pgqueuer_peer

        return pgqueuer_peer.run_worker
    if system == "procrastinate":
        from bench.peers import procrastinate_peer

        return procrastinate_peer.run_worker
    raise SystemExit(f"unknown system {system!r}")


def _write_profile(profiler: Any, path: Path) -> None:
    path.write_text(profiler.output_text(unicode=True, show_all=False))
    path.with_suffix(".html").write_text(profiler.output_html())


async def _main(args: argparse.Namespace) -> None:
    run_worker = _load(args.system)
    reporter = common.Reporter(args.mode, args.expect)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    cpu0 = time.process_time()
    profiler: Any = None
    if args.pyinstrument:
        from pyinstrument import Profiler

        profiler = Profiler(async_mode="disabled", interval=0.0005)
        profiler.start()
    try:
        await run_worker(
            args.dsn, args.mode, reporter, stop, concurrency=args.concurrency, trace=args.trace
        )
    finally:
        if profiler is not None:
            profiler.stop()
            _write_profile(profiler, Path(args.pyinstrument))
        reporter.emit("STAT " + json.dumps({"worker_cpu_s": round(time.process_time() - cpu0, 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=["kaiju", "pgqueuer", "procrastinate"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument(
        "--mode", required=True, choices=[common.NOOP, common.LATENCY, common.PIPELINE]
    )
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--trace", action="store_true", help="time store calls (kaiju)")
    parser.add_argument("--pyinstrument", metavar="FILE", help="profile into FILE (.txt/.html)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
