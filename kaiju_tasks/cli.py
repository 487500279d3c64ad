"""Composition root: settings, pool, store, clock; the ``kaiju-tasks`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from kaiju_tasks import config, errors, logs, methods
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager
from kaiju_tasks.store import embedded, migrate, postgres

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def database(settings: config.Settings) -> Iterator[str]:
    """Yield the configured DSN, or start the embedded server for the duration."""
    if settings.database.dsn:
        yield settings.database.dsn
        return
    data_dir = embedded.default_data_dir(
        settings.database.embedded_dir or os.environ.get(embedded.ENV_DATA_DIR) or None
    )
    server = embedded.EmbeddedPostgres(data_dir)
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def engine_store(
    settings: config.Settings, dsn: str, component: str = "kaiju-tasks"
) -> AsyncIterator[postgres.PostgresEngineStore]:
    """Open the pool and yield the engine store."""
    pool = await postgres.create_pool(
        dsn,
        min_size=settings.database.pool_min,
        max_size=settings.database.pool_max,
        application_name=component,
    )
    try:
        yield postgres.PostgresEngineStore(pool)
    finally:
        await pool.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaiju-tasks", description="PostgreSQL-backed task manager for asyncio applications."
    )
    parser.add_argument("--config-path", type=Path, help="configuration file (highest file layer)")
    parser.add_argument("--dsn", help="PostgreSQL DSN (overrides [database] dsn)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--log-format", choices=["text", "json"], help="log record format")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply pending database migrations")

    executor = commands.add_parser("executor", help="run an executor")
    executor.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="NAME[=URL]",
        help="serve this app; with =URL its stages are JSON-RPC calls to URL (repeatable)",
    )
    executor.add_argument(
        "--methods",
        action="append",
        default=[],
        metavar="MODULE:ATTRIBUTE",
        help="import a kaiju_tasks.methods.Methods registry to run stages in-process",
    )
    executor.add_argument("--concurrency", type=int, default=10, help="tasks run at once")
    executor.add_argument("--id", help="executor id (default: host-pid-random)")
    executor.add_argument(
        "--shutdown-grace", type=float, default=10.0, help="seconds to finish stages on stop"
    )
    executor.add_argument(
        "--heartbeat", type=float, default=5.0, help="seconds between liveness records"
    )
    executor.add_argument(
        "--poll", type=float, default=1.0, help="longest seconds between claims when idle"
    )

    manager = commands.add_parser("manager", help="run the manager (one leader per database)")
    manager.add_argument("--interval", type=float, default=1.0, help="seconds between ticks")
    manager.add_argument(
        "--stale-after",
        type=float,
        default=30.0,
        help="seconds of executor silence before its tasks are rescued",
    )
    manager.add_argument("--disable-gc", action="store_true", help="no garbage collection")
    manager.add_argument("--disable-scheduler", action="store_true", help="only collect garbage")
    manager.add_argument(
        "--standby-interval",
        type=float,
        default=2.0,
        help="seconds between a standby's attempts to take the leadership",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        settings, _ = config.load(
            config_path=args.config_path,
            overrides={
                "database": {"dsn": args.dsn},
                "logging": {"level": args.log_level, "format": args.log_format},
            },
        )
        logs.configure(settings.logging.level, settings.logging.format)
        if args.command == "migrate":
            return _migrate(settings)
        if args.command == "executor":
            return _serve(
                settings,
                "kaiju-tasks-executor",
                lambda dsn, store: _executor(settings, args, dsn, store),
            )
        if args.command == "manager":
            return _serve(
                settings, "kaiju-tasks-manager", lambda dsn, store: _manager(args, dsn, store)
            )
    except errors.KaijuTasksError as exc:
        print(f"kaiju-tasks: {exc}", file=sys.stderr)
        return 1
    return 2


def _migrate(settings: config.Settings) -> int:
    with database(settings) as dsn:
        applied: list[Any] = asyncio.run(migrate.migrate(dsn))
    print(json.dumps({"applied": applied}) if applied else "database is up to date")
    return 0


def _load_methods(specs: Sequence[str]) -> methods.Methods:
    registry = methods.Methods()
    for spec in specs:
        module_name, _, attribute = spec.partition(":")
        try:
            found = getattr(importlib.import_module(module_name), attribute or "methods")
        except (ImportError, AttributeError) as exc:
            raise errors.ConfigError(f"cannot import methods {spec!r}: {exc}") from exc
        if not isinstance(found, methods.Methods):
            raise errors.ConfigError(f"{spec!r} is not a kaiju_tasks.methods.Methods registry")
        for name in found:
            function = found.get(name)
            assert function is not None
            registry.add(name, function)
    return registry


def _executor(
    settings: config.Settings, args: argparse.Namespace, dsn: str, store: Any
) -> Executor:
    apps: list[str] = []
    urls = dict(settings.apps)
    for spec in args.app or ["default"]:
        name, _, url = spec.partition("=")
        apps.append(name)
        if url:
            urls[name] = url
    return Executor(
        store,
        apps=apps,
        methods=_load_methods(args.methods),
        app_urls=urls,
        dsn=dsn,
        executor_id=args.id,
        concurrency=args.concurrency,
        shutdown_grace=timedelta(seconds=args.shutdown_grace),
        heartbeat_interval=timedelta(seconds=args.heartbeat),
        poll_interval=timedelta(seconds=args.poll),
    )


def _manager(args: argparse.Namespace, dsn: str, store: Any) -> Manager:
    from kaiju_tasks.manager import steps

    return Manager(
        store,
        leadership=postgres.AdvisoryLeadership(dsn),
        dsn=dsn,
        interval=timedelta(seconds=args.interval),
        standby_interval=timedelta(seconds=args.standby_interval),
        settings=steps.Settings(stale_after=timedelta(seconds=args.stale_after)),
        scheduler=not args.disable_scheduler,
        gc=not args.disable_gc,
    )


def _serve(settings: config.Settings, component: str, build: Any) -> int:
    """Run a component until SIGINT or SIGTERM, then stop it cleanly."""

    async def serve(dsn: str) -> None:
        async with engine_store(settings, dsn, component) as store:
            running = build(dsn, store)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            async with running:
                print(f"kaiju-tasks {type(running).__name__.lower()} running", flush=True)
                await stop.wait()

    with database(settings) as dsn:
        asyncio.run(serve(dsn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
