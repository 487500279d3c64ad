"""One worker process of one system: ``python -m bench.worker SYSTEM --dsn ... --mode ...``.

Started by bench/run.py in its own process (and session). Reports on stdout (see
``common.Reporter``); stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
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


SYSTEMS = (
    "kaiju",
    "kaiju-batch",  # kaiju with remote stage calls batched (`[apps] ... batch=50`)
    "kaiju-otel",  # kaiju recording every span with the OpenTelemetry SDK (dropped at export)
    "pgqueuer",
    "pgqueuer-defaults",
    "procrastinate",
)


def _load(system: str) -> WorkerFn:
    if system.startswith("kaiju"):
        from bench import kaiju

        return kaiju.run_worker
    if system in ("pgqueuer", "pgqueuer-defaults"):
        from bench.peers import pgqueuer_peer

        defaults = system == "pgqueuer-defaults"
        return functools.partial(pgqueuer_peer.run_worker, defaults=defaults)
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
            args.dsn,
            args.mode,
            reporter,
            stop,
            concurrency=args.concurrency,
            trace=args.trace,
            service_url=args.service_url,
        )
    finally:
        if profiler is not None:
            profiler.stop()
            _write_profile(profiler, Path(args.pyinstrument))
        reporter.emit("STAT " + json.dumps({"worker_cpu_s": round(time.process_time() - cpu0, 3)}))


def _tracing(mode: str) -> None:
    """``BENCH_TRACING``: ``off`` hides OpenTelemetry (as if not installed), ``sdk`` records
    every span with the SDK and drops it at export; anything else leaves the API as installed
    (a no-op without an SDK). For the overhead figures of docs/benchmarks.md."""
    if mode == "off":
        sys.modules["opentelemetry"] = None  # type: ignore[assignment]
    elif mode == "sdk":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Drop(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        trace.set_tracer_provider(provider)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=SYSTEMS)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--mode", required=True, choices=common.MODES)
    parser.add_argument("--service-url", help="remote modes: the JSON-RPC service's URL")
    parser.add_argument("--expect", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--trace", action="store_true", help="time store calls (kaiju)")
    parser.add_argument("--pyinstrument", metavar="FILE", help="profile into FILE (.txt/.html)")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    if args.system == "kaiju-batch":
        os.environ.setdefault("BENCH_KAIJU_BATCH", "50")
    _tracing("sdk" if args.system == "kaiju-otel" else os.environ.get("BENCH_TRACING", ""))
    logging.basicConfig(level=args.log_level, stream=sys.stderr)
    if args.mode in (common.REMOTE, common.REMOTE_PIPELINE) and not args.service_url:
        parser.error(f"--mode {args.mode} needs --service-url")
    if args.system == "pgqueuer-defaults" and os.environ.get("BENCH_PGQ_UVLOOP", "1") == "1":
        import uvloop  # what `pgq run` runs its worker on when uvloop is installed

        uvloop.run(_main(args))
    elif args.system.startswith("kaiju") and os.environ.get("BENCH_KAIJU_UVLOOP") == "1":
        import uvloop

        uvloop.run(_main(args))
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
