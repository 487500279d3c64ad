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

from kaiju_tasks import config, errors, logs, methods, models
from kaiju_tasks.clock import SystemClock
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager
from kaiju_tasks.service import NotificationService, TaskService, TokenService
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

    server = commands.add_parser("server", help="run the HTTP JSON-RPC API")
    server.add_argument("--host", help="listen address (default [server] host, 127.0.0.1)")
    server.add_argument("--port", type=int, help="TCP port (default [server] port, 8080)")

    run = commands.add_parser(
        "run",
        help="everything in one process: migrations, manager, executor and HTTP API "
        "(embedded PostgreSQL when no database is configured)",
    )
    run.add_argument("--host", help="listen address (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="TCP port (default 8080)")
    run.add_argument(
        "--demo",
        action="store_true",
        help="register example methods and submit an example pipeline",
    )
    run.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="NAME[=URL]",
        help="apps the executor serves (default: default)",
    )
    run.add_argument(
        "--methods",
        action="append",
        default=[],
        metavar="MODULE:ATTRIBUTE",
        help="import a Methods registry to run stages in-process",
    )

    token = commands.add_parser("token", help="manage API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="create a token and print it (once)")
    create.add_argument("--user", required=True, help="the user id the token acts as")
    create.add_argument(
        "--permission",
        action="append",
        default=[],
        choices=[p.value for p in models.Permission],
        help="grant a permission (repeatable)",
    )
    create.add_argument("--system", action="store_true", help="grant everything")
    create.add_argument("--name", help="a note to recognise the token by")
    token_commands.add_parser("list", help="list tokens (never their secret)")
    revoke = token_commands.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)
    for sub in (create, token_commands.choices["list"], revoke):
        sub.add_argument("--json", action="store_true", help="print JSON")
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
        if args.command == "server":
            return _serve(
                settings, "kaiju-tasks-server", lambda dsn, store: _server(settings, args, store)
            )
        if args.command == "token":
            return _token(settings, args)
        if args.command == "run":
            return _run(settings, args)
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


class _HttpServer:
    """The HTTP API as an ``async with`` component."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        from aiohttp import web

        self._runner = web.AppRunner(app, access_log=None)
        self.host = host
        self.port = port
        self.url = ""

    async def __aenter__(self) -> _HttpServer:
        from aiohttp import web

        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]  # the real port when 0 was asked for
        self.url = f"http://{host}:{port}/public/rpc"
        print(f"kaiju-tasks API on {self.url}", flush=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


def _api(store: Any, registry: methods.Methods, settings: config.Settings) -> Any:
    from kaiju_tasks.rpc import server as rpc_server

    async def health() -> dict[str, Any]:
        now = SystemClock().now()
        result: dict[str, Any] = await store.health(alive_since=now - timedelta(seconds=60))
        result["status"] = "ok" if result["leader"] else "degraded"
        return result

    return rpc_server.Api(
        tasks=TaskService(store),
        notifications=NotificationService(store),
        tokens=TokenService(store),
        methods=registry,
        health=health,
        max_body=settings.server.max_body,
        max_batch=settings.server.max_batch,
        request_timeout=float(settings.server.request_timeout),
    )


def _server(settings: config.Settings, args: argparse.Namespace, store: Any) -> _HttpServer:
    from kaiju_tasks.rpc import server as rpc_server

    app = rpc_server.create_app(_api(store, methods.Methods(), settings))
    return _HttpServer(
        app,
        args.host or settings.server.host,
        args.port if args.port is not None else settings.server.port,
    )


def _token(settings: config.Settings, args: argparse.Namespace) -> int:
    async def act(dsn: str) -> Any:
        async with engine_store(settings, dsn, "kaiju-tasks-cli") as store:
            tokens = TokenService(store)
            if args.token_command == "create":
                permissions = ["system"] if args.system else args.permission
                return await tokens.create(args.user, permissions, args.name)
            if args.token_command == "revoke":
                return await tokens.revoke(args.id)
            return await tokens.list()

    with database(settings) as dsn:
        result = asyncio.run(act(dsn))
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.token_command == "create":
        print(result["token"])
    elif args.token_command == "revoke":
        print(f"token {result['id']} revoked")
    else:
        print(f"{'id':>5}  {'user':20}  {'permissions':30}  {'created':25}  revoked")
        for row in result:
            print(
                f"{row['id']:>5}  {row['user_id']:20}  {','.join(row['permissions']):30}  "
                f"{row['created']:25}  {row['revoked_at'] or ''}"
            )
    return 0


def _run(settings: config.Settings, args: argparse.Namespace) -> int:
    """Everything in one process, until Ctrl-C."""

    async def serve(dsn: str) -> None:
        from kaiju_tasks import demo
        from kaiju_tasks.rpc import server as rpc_server

        await migrate.migrate(dsn)
        registry = _load_methods(args.methods)
        apps = [spec.partition("=")[0] for spec in args.app] or ["default"]
        if args.demo:
            demo.register(registry)
            if demo.APP not in apps:
                apps.append(demo.APP)
        urls = dict(settings.apps)
        urls.update({n: u for n, _, u in (s.partition("=") for s in args.app) if u})
        async with engine_store(settings, dsn, "kaiju-tasks-run") as store:
            tokens = TokenService(store)
            token = await tokens.create("admin", ["system"], "kaiju-tasks run")
            app = rpc_server.create_app(_api(store, registry, settings))
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            manager = Manager(store, leadership=postgres.AdvisoryLeadership(dsn), dsn=dsn)
            executor = Executor(store, apps=apps, methods=registry, app_urls=urls, dsn=dsn)
            http = _HttpServer(
                app,
                args.host or settings.server.host,
                args.port if args.port is not None else settings.server.port,
            )
            async with manager, executor, http:
                print(f"system token: {token['token']}", flush=True)
                if args.demo:
                    task = await demo.submit(TaskService(store))
                    print(
                        f"demo task {task['id']} submitted; follow it with:\n"
                        f"  curl -s {http.url} -H 'Authorization: Bearer {token['token']}' "
                        f'-d \'{{"jsonrpc": "2.0", "id": 1, "method": "tasks.get", '
                        f'"params": {{"id": "{task["id"]}", "columns": '
                        f'["status", "stage", "result"]}}}}\'',
                        flush=True,
                    )
                print("kaiju-tasks running; Ctrl-C stops", flush=True)
                await stop.wait()
                print("stopping", flush=True)

    with database(settings) as dsn:
        asyncio.run(serve(dsn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
