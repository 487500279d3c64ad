"""Composition root: settings, pool, store, clock; the ``kaiju-tasks`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from kaiju_tasks import config, errors, limits, logs, methods, models, redact
from kaiju_tasks.clock import SystemClock
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager
from kaiju_tasks.service import NotificationService, TaskService, TokenService
from kaiju_tasks.store import embedded, migrate, postgres

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def database(settings: config.Settings) -> Iterator[str]:
    """Yield the direct DSN, or start the embedded server for the duration.

    The direct DSN is ``[database] direct_dsn`` when ``dsn`` is a transaction pooler, else
    ``dsn``: LISTEN, the leadership lock, event following and migrations use it; the pools
    of :func:`engine_store` use ``dsn``.
    """
    if settings.database.dsn:
        yield settings.database.direct_dsn or settings.database.dsn
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
    """Open the pool and yield the engine store (the schema must be current).

    ``dsn`` is the direct DSN (see :func:`database`); the pool goes through the transaction
    pooler of ``[database] dsn`` when ``[database] direct_dsn`` is set.
    """
    await migrate.check_current(dsn)
    pooler = bool(settings.database.direct_dsn)
    pool = await postgres.create_pool(
        settings.database.dsn if pooler and settings.database.dsn else dsn,
        min_size=settings.database.pool_min,
        max_size=settings.database.pool_max,
        application_name=component,
        pooler=pooler,
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
    parser.add_argument(
        "--log-level",
        help="DEBUG, INFO, WARNING, ERROR, CRITICAL (default [logging] level; WARNING for "
        "migrate, token, task, notifications, events, top and config)",
    )
    parser.add_argument("--log-format", choices=["text", "json"], help="log record format")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply pending database migrations")

    executor = commands.add_parser("executor", help="run an executor")
    executor.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="NAME[=URL]",
        help="serve this app; with =URL its stages are JSON-RPC calls to URL, with"
        " '=URL batch=N' in JSON-RPC batches of up to N calls (repeatable)",
    )
    executor.add_argument(
        "--methods",
        action="append",
        default=[],
        metavar="MODULE:ATTRIBUTE",
        help="import a kaiju_tasks.methods.Methods registry to run stages in-process",
    )
    executor.add_argument("--concurrency", type=int, help="tasks run at once ([executor])")
    executor.add_argument("--prefetch", type=int, help="tasks claimed ahead of free slots")
    executor.add_argument("--id", help="executor id (default: host-pid-random)")
    executor.add_argument("--shutdown-grace", type=float, help="seconds to finish stages on stop")
    executor.add_argument("--heartbeat", type=float, help="seconds between liveness records")
    executor.add_argument("--poll", type=float, help="longest seconds between claims when idle")
    executor.add_argument(
        "--debug",
        action="store_true",
        help="serve private queues APP@debug-RANDOM only (printed at start), never the apps'"
        " own: route a task there with `task copy ID --app QUEUE`; their tasks fail when it stops",
    )

    manager = commands.add_parser("manager", help="run the manager (one leader per database)")
    manager.add_argument("--interval", type=float, help="seconds between ticks ([manager])")
    manager.add_argument(
        "--stale-after",
        type=float,
        help="seconds of executor silence before its tasks are rescued",
    )
    manager.add_argument("--disable-gc", action="store_true", help="no garbage collection")
    manager.add_argument("--disable-scheduler", action="store_true", help="only collect garbage")
    manager.add_argument(
        "--standby-interval",
        type=float,
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

    task = commands.add_parser("task", help="create, inspect and control tasks")
    task_commands = task.add_subparsers(dest="task_command", required=True)
    t_create = task_commands.add_parser("create", help="create a task from JSON")
    t_create.add_argument("data", help="the task as JSON (a list creates many), or - for stdin")
    t_get = task_commands.add_parser("get", help="show a task")
    t_get.add_argument("id")
    t_get.add_argument("--columns", help="comma-separated columns")
    t_list = task_commands.add_parser("list", help="list tasks, newest first")
    t_list.add_argument("--status", action="append", help="only these statuses (repeatable)")
    t_list.add_argument("--app", action="append", help="only these apps (repeatable)")
    t_list.add_argument("--conditions", help="filter as JSON (see the guide)")
    t_list.add_argument("--limit", type=int, default=20)
    t_list.add_argument("--offset", type=int, default=0)
    for name, text in (
        ("reset", "reset a task and queue it again"),
        ("cancel", "cancel a task that has not ended"),
    ):
        task_commands.add_parser(name, help=text).add_argument("id")
    t_copy = task_commands.add_parser(
        "copy", help="queue a copy of a task (new id, no cron or next_task), e.g. for a debug queue"
    )
    t_copy.add_argument("id")
    t_copy.add_argument("--app", help="the copy's app_name (default: the original's)")
    t_message = task_commands.add_parser("message", help="send a message to a waiting task")
    t_message.add_argument("id")
    t_message.add_argument("data", help="the message as JSON")

    notes = commands.add_parser("notifications", help="read notifications")
    notes_commands = notes.add_subparsers(dest="notifications_command", required=True)
    n_list = notes_commands.add_parser("list", help="list notifications, newest first")
    n_list.add_argument("--task", help="only those of this task")
    n_list.add_argument("--limit", type=int, default=20)

    events = commands.add_parser("events", help="print lifecycle events as they happen")
    events.add_argument("--verbose", action="store_true", help="print each event's details")
    events.add_argument("--app", help="only events of this app's tasks")
    events.add_argument("--task", help="only events of this task")
    events.add_argument(
        "--from-start",
        action="store_true",
        help="replay the kept events first instead of starting from now",
    )
    events.add_argument("--limit", type=int, help="stop after this many events")
    events.add_argument("--timeout", type=float, help="stop after this many seconds")

    top = commands.add_parser("top", help="a live table of executors and running tasks")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--limit", type=int, default=30, help="most running or waiting tasks shown")

    config_command = commands.add_parser(
        "config", help="print the effective configuration and where each value came from"
    )
    for sub in (*task_commands.choices.values(), n_list, config_command):
        sub.add_argument("--json", action="store_true", help="print JSON")
    return parser


QUIET_COMMANDS = frozenset({"migrate", "token", "task", "notifications", "events", "top", "config"})
"""Short commands: they log at :data:`QUIET_LEVEL` unless ``--log-level`` is given."""
QUIET_LEVEL = "WARNING"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        settings, sources = config.load(
            config_path=args.config_path,
            overrides={
                "database": {"dsn": args.dsn},
                "logging": {"level": args.log_level, "format": args.log_format},
            },
        )
        level = settings.logging.level
        if args.log_level is None and args.command in QUIET_COMMANDS:
            level = QUIET_LEVEL  # short commands speak only of trouble, as git and psql do
        logs.configure(level, settings.logging.format)
        limits.configure(settings.limits)
        if args.command == "migrate":
            return _migrate(settings)
        if args.command == "executor":
            return _serve(
                settings,
                "kaiju-tasks-executor",
                lambda dsn, store: _executor(settings, args, dsn, store, sources),
            )
        if args.command == "manager":
            return _serve(
                settings,
                "kaiju-tasks-manager",
                lambda dsn, store: _manager(settings, args, dsn, store),
            )
        if args.command == "server":
            return _serve(
                settings,
                "kaiju-tasks-server",
                lambda dsn, store: _server(settings, args, dsn, store),
            )
        if args.command == "token":
            return _token(settings, args)
        if args.command == "run":
            return _run(settings, args, sources)
        if args.command in ("task", "notifications"):
            return _task(settings, args)
        if args.command == "top":
            return _top(settings, args)
        if args.command == "events":
            return _events(settings, args)
        if args.command == "config":
            return _config(settings, sources, args)
    except errors.KaijuTasksError as exc:
        print(f"kaiju-tasks: {redact.text(str(exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `kaiju-tasks task list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
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
            registry.add(name, function, access=found.access(name))
    return registry


def _pick(given: Any, configured: Any) -> Any:
    """A command-line value when given, else the configured one."""
    return configured if given is None else given


def _executor(
    settings: config.Settings,
    args: argparse.Namespace,
    dsn: str,
    store: Any,
    sources: Mapping[str, str],
) -> Executor:
    apps, urls, batch = _apps(settings, args.app, sources)
    return _build_executor(
        settings, store, dsn, apps, _load_methods(args.methods), urls, args, batch
    )


def _apps(
    settings: config.Settings, specs: Sequence[str], sources: Mapping[str, str]
) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """App names to serve, their URLs and their call batch sizes.

    ``--app NAME[=URL [batch=N]]`` options, else ``[executor] apps`` when it is set; else
    ``default`` and every app ``[apps]`` gives a URL. URLs from ``[apps]``, overridden by the
    options.
    """
    configured = [a.strip() for a in settings.executor.apps.split(",") if a.strip()]
    if "executor.apps" not in sources:  # not set: the apps with a URL are served too
        configured += [name for name in settings.apps if name not in configured]
    apps: list[str] = []
    urls = dict(settings.apps)
    batch = dict(settings.app_batch)
    for spec in specs or configured:
        name, _, value = spec.partition("=")
        apps.append(name)
        if value:
            urls[name], size = config.parse_app(name, value, "--app")
            batch.pop(name, None)
            if size > 1:
                batch[name] = size
    if settings.executor.token:
        config.check_app_credentials(urls, {n: "--app" for n in urls if n not in settings.apps})
    return apps, urls, batch


def _build_executor(
    settings: config.Settings,
    store: Any,
    dsn: str,
    apps: list[str],
    registry: methods.Methods,
    urls: dict[str, str],
    args: argparse.Namespace,
    batch: dict[str, int] | None = None,
) -> Executor:
    conf = settings.executor
    return Executor(
        store,
        apps=apps,
        methods=registry,
        app_urls=urls,
        app_batch=batch,
        dsn=dsn,
        executor_id=getattr(args, "id", None),
        concurrency=_pick(getattr(args, "concurrency", None), conf.concurrency),
        prefetch=_pick(getattr(args, "prefetch", None), conf.prefetch),
        shutdown_grace=timedelta(
            seconds=_pick(getattr(args, "shutdown_grace", None), conf.shutdown_grace)
        ),
        heartbeat_interval=timedelta(
            seconds=_pick(getattr(args, "heartbeat", None), conf.heartbeat_interval)
        ),
        poll_interval=timedelta(seconds=_pick(getattr(args, "poll", None), conf.poll_interval)),
        app_token=conf.token,
        debug=getattr(args, "debug", False),
    )


def _manager(settings: config.Settings, args: argparse.Namespace, dsn: str, store: Any) -> Manager:
    from kaiju_tasks.manager import steps

    conf = settings.manager
    days = timedelta(days=1)
    scheduler = not getattr(args, "disable_scheduler", False)
    if not scheduler and getattr(args, "disable_gc", False):
        raise errors.ConfigError("--disable-gc with --disable-scheduler leaves nothing to do")
    return Manager(
        store,
        leadership=postgres.AdvisoryLeadership(
            dsn, postgres.LEADER_LOCK_KEY if scheduler else postgres.GC_LOCK_KEY
        ),
        dsn=dsn,
        interval=timedelta(seconds=_pick(getattr(args, "interval", None), conf.interval)),
        standby_interval=timedelta(
            seconds=_pick(getattr(args, "standby_interval", None), conf.standby_interval)
        ),
        gc_interval=timedelta(seconds=conf.gc_interval),
        settings=steps.Settings(
            stale_after=timedelta(
                seconds=_pick(getattr(args, "stale_after", None), conf.stale_after)
            ),
            task_retention=days * conf.task_retention,
            notification_retention=days * conf.notification_retention,
            event_retention=days * conf.event_retention,
        ),
        scheduler=scheduler,
        gc=not getattr(args, "disable_gc", False),
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
                print(f"kaiju-tasks {component.removeprefix('kaiju-tasks-')} running", flush=True)
                for app, queue in getattr(running, "debug_queues", {}).items():
                    print(f"debug queue for {app}: {queue}", flush=True)
                await stop.wait()

    with database(settings) as dsn:
        asyncio.run(serve(dsn))
    return 0


class _HttpServer:
    """The HTTP API as an ``async with`` component."""

    def __init__(self, app: Any, host: str, port: int, metrics: Any = None) -> None:
        from kaiju_tasks.rpc import server as rpc_server

        self._runner = rpc_server.runner(app)
        self.metrics = metrics
        self.host = host
        self.port = port
        self.url = ""

    async def __aenter__(self) -> _HttpServer:
        from aiohttp import web

        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise errors.ConfigError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        if self.metrics is not None:
            await self.metrics.start()
        host, port = self._runner.addresses[0][:2]  # the real port when 0 was asked for
        self.url = f"http://{host}:{port}/public/rpc"
        print(f"kaiju-tasks API on {self.url}", flush=True)
        print(f"dashboard on http://{host}:{port}/ (log in with an API token)", flush=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        if self.metrics is not None:
            await self.metrics.stop()


HEALTH_UNSERVED = 20
"""Most apps ``/health`` lists under ``unserved_apps``."""


def _api(
    store: Any, registry: methods.Methods, settings: config.Settings, metrics: Any = None
) -> Any:
    from kaiju_tasks.rpc import server as rpc_server

    async def health() -> dict[str, Any]:
        now = SystemClock().now()
        from kaiju_tasks.metrics import ALIVE_WITHIN

        result: dict[str, Any] = await store.health(alive_since=now - ALIVE_WITHIN)
        result["status"] = "ok" if result["leader"] else "degraded"
        result["unserved_apps"] = [
            {"app": u["app"], "queued": u["queued"], "waiting_s": round(u["waiting_s"], 1)}
            for u in await store.unserved_apps(
                now=now, alive_since=now - ALIVE_WITHIN, limit=HEALTH_UNSERVED
            )
        ]
        return result

    server = settings.server
    return rpc_server.Api(
        tasks=TaskService(store),
        notifications=NotificationService(store),
        tokens=TokenService(store),
        methods=registry,
        health=health,
        max_body=server.max_body,
        max_batch=server.max_batch,
        request_timeout=float(server.request_timeout),
        header_timeout=server.header_timeout,
        body_timeout=server.body_timeout,
        auth_failures=server.auth_failures,
        auth_window=server.auth_window,
        auth_clients=server.auth_clients,
        trusted_proxies=config.networks(server.trusted_proxies),
        metrics=metrics.render if metrics is not None else None,
        on_auth_refused=auth_counter(metrics.registry) if metrics is not None else None,
    )


def auth_counter(registry: Any) -> Any:
    """``kaiju_tasks_auth_refused_total{reason}`` on the /metrics registry; its ``inc``."""
    from prometheus_client import Counter

    counter = Counter(
        "kaiju_tasks_auth_refused",
        "HTTP requests refused for their token: reason=invalid (a failed authentication) or "
        "rate_limited (HTTP 429, too many failures from the address)",
        ["reason"],
        registry=registry,
    )
    for reason in ("invalid", "rate_limited"):
        counter.labels(reason)  # both series exist from the start, at 0

    def refused(reason: str) -> None:
        counter.labels(reason).inc()

    return refused


def _web_app(api: Any, store: Any, dsn: str) -> Any:
    """The HTTP API with the dashboard at ``/``."""
    from kaiju_tasks import dashboard
    from kaiju_tasks.rpc import server as rpc_server

    app = rpc_server.create_app(api)
    data = dashboard.DashboardData(store.pool, dsn)
    tokens = rpc_server.counted_tokens(app)  # the dashboard's failures count too
    dashboard.setup(app, dashboard.Dashboard(api.tasks, tokens, data))
    return app


def _server(
    settings: config.Settings, args: argparse.Namespace, dsn: str, store: Any
) -> _HttpServer:
    from kaiju_tasks.metrics import Metrics

    metrics = Metrics(store, dsn)
    app = _web_app(_api(store, methods.Methods(), settings, metrics), store, dsn)
    return _HttpServer(
        app,
        args.host or settings.server.host,
        args.port if args.port is not None else settings.server.port,
        metrics,
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
        print(f"{'id':>5}  {'user':20}  {'permissions':30}  {'created':32}  revoked")
        for row in result:
            print(
                f"{row['id']:>5}  {row['user_id']:20}  {','.join(row['permissions']):30}  "
                f"{row['created']:32}  {row['revoked_at'] or ''}"
            )
    return 0


RUN_TOKEN_NAME = "kaiju-tasks run"
RUN_TOKEN_DIR = "run-tokens"
"""Directory, under the per-user state directory, where ``run`` keeps its system tokens."""


def run_token_path(dsn: str, state_dir: Path | None = None) -> Path:
    """The file where ``kaiju-tasks run`` keeps its system token for the database ``dsn``.

    One file per database (named by a digest of the DSN without its password), in
    ``$XDG_STATE_HOME/kaiju-tasks/run-tokens`` (``~/.local/state/kaiju-tasks/run-tokens``).

    Args:
        dsn: the database ``run`` uses (the embedded server's DSN names its data directory).
        state_dir: the per-user state directory (default: platformdirs' ``user_state_path``).
    """
    import hashlib
    from urllib.parse import urlsplit, urlunsplit

    import platformdirs

    key = dsn
    with contextlib.suppress(ValueError):
        parts = urlsplit(dsn)
        if parts.password is not None:  # a changed password is still the same database
            userinfo, _, host = parts.netloc.rpartition("@")
            key = urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}@{host}"))
    digest = hashlib.sha256(key.encode(errors="surrogatepass")).hexdigest()[:16]
    base = state_dir or platformdirs.user_state_path("kaiju-tasks")
    return base / RUN_TOKEN_DIR / f"{digest}.token"


def _read_private(path: Path) -> str | None:
    """The text of ``path`` if it exists, is ours and only we may read it; else None."""
    try:
        st = path.stat()
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            logger.warning(
                "Saved run token ignored: others may read its file",
                extra={"event": "run_token_ignored", "path": str(path)},
            )
            return None
        return path.read_text().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (mode 0600, its directory 0700), replacing it atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)
    tmp.replace(path)


async def run_token(tokens: TokenService, dsn: str) -> tuple[str, Path, bool]:
    """The system token ``run`` prints: the saved one while it works, else a new one.

    The saved token is used again if the database still knows it, unrevoked, as a system
    token; otherwise a new system token (user ``admin``, named ``kaiju-tasks run``) is created
    and saved in :func:`run_token_path`. No token is ever revoked here.

    Returns:
        The token, the file it is kept in, and whether it was reused.
    """
    path = run_token_path(dsn)
    saved = _read_private(path)
    if saved is not None:
        try:
            if (await tokens.authenticate(saved)).is_system:
                return saved, path, True
        except errors.NotAuthorized:
            pass  # revoked or from another database: make a new one
    created = await tokens.create("admin", ["system"], RUN_TOKEN_NAME)
    _write_private(path, created["token"])
    return created["token"], path, False


def _run(settings: config.Settings, args: argparse.Namespace, sources: Mapping[str, str]) -> int:
    """Everything in one process, until Ctrl-C."""

    async def serve(dsn: str) -> None:
        from kaiju_tasks import demo

        await migrate.migrate(dsn)
        registry = _load_methods(args.methods)
        apps, urls, batch = _apps(settings, args.app, sources)
        if args.demo:
            demo.register(registry)
            for name in registry:
                if name.startswith("demo."):  # the tour calls them with any token
                    registry.set_access(name, public=True)
            if demo.APP not in apps:
                apps.append(demo.APP)
        async with engine_store(settings, dsn, "kaiju-tasks-run") as store:
            from kaiju_tasks.metrics import Metrics

            metrics = Metrics(store, dsn)
            app = _web_app(_api(store, registry, settings, metrics), store, dsn)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, stop.set)
            manager = _manager(settings, args, dsn, store)
            executor = _build_executor(settings, store, dsn, apps, registry, urls, args, batch)
            http = _HttpServer(
                app,
                args.host or settings.server.host,
                args.port if args.port is not None else settings.server.port,
                metrics,
            )
            # The port first: a start that cannot listen (another `run` has it) leaves tokens,
            # executors and tasks as they were.
            async with http:
                token, token_file, _ = await run_token(TokenService(store), dsn)
                async with manager, executor:
                    print(f"system token: {token}", flush=True)
                    print(f"system token file: {token_file} (the next start reuses it)", flush=True)
                    if args.demo:
                        task = await demo.submit(TaskService(store))
                        print(
                            f"demo task {task['id']} submitted; follow it with:\n"
                            f"  curl -s {http.url} -H 'Authorization: Bearer {token}' "
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


def _json_arg(text: str, what: str) -> Any:
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise errors.ValidationError(f"{what} is not valid JSON: {exc}", field=what) from None


TASK_TABLE = ("id", "app_name", "status", "stage", "stages", "exit_code", "created")


def _task(settings: config.Settings, args: argparse.Namespace) -> int:
    """``task ...`` and ``notifications list``, as the system caller."""

    async def act(dsn: str) -> Any:
        async with engine_store(settings, dsn, "kaiju-tasks-cli") as store:
            tasks = TaskService(store)
            if args.command == "notifications":
                conditions = {"task_id": args.task} if args.task else None
                return await NotificationService(store).list(
                    conditions=conditions, sort=[{"desc": "created"}], limit=args.limit
                )
            command = args.task_command
            if command == "create":
                created = await tasks.create(_json_arg(args.data, "data"))
                await _warn_unserved(store, created)
                return created
            if command == "get":
                columns = args.columns.split(",") if args.columns else None
                return await tasks.get(args.id, columns)
            if command == "list":
                conditions = _json_arg(args.conditions, "conditions") if args.conditions else {}
                if args.status:
                    conditions["status"] = args.status
                if args.app:
                    conditions["app_name"] = args.app
                return await tasks.list(
                    conditions=conditions,
                    sort=[{"desc": "created"}],
                    offset=args.offset,
                    limit=args.limit,
                    columns=list(TASK_TABLE),
                )
            if command == "message":
                return await tasks.write_message(args.id, _json_arg(args.data, "data"))
            if command == "copy":
                created = await tasks.copy(args.id, args.app)
                await _warn_unserved(store, created)
                return created
            return await getattr(tasks, command)(args.id)

    with database(settings) as dsn:
        result = asyncio.run(act(dsn))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif isinstance(result, dict) and "data" in result and "on_page" in result:
        columns = (
            TASK_TABLE
            if args.command == "task"
            else ("id", "task_id", "status", "exit_code", "read", "created")
        )
        _print_table(result["data"], columns)
        print(f"{result['on_page']} of {result['count']}")
    elif isinstance(result, list):
        _print_table(result, ("id", "status", "job_id"))
    elif isinstance(result, dict):
        width = max(len(k) for k in result)
        for key, value in result.items():
            shown = value if isinstance(value, str) or value is None else json.dumps(value)
            print(f"{key:<{width}}  {shown}")
    return 0


async def _warn_unserved(store: Any, created: Any) -> None:
    """Warn on stderr about each created task's app that no live executor serves."""
    from kaiju_tasks.metrics import ALIVE_WITHIN

    rows = created if isinstance(created, list) else [created]
    apps = sorted({r["app_name"] for r in rows if isinstance(r, dict) and r.get("app_name")})
    if not apps:
        return
    now = SystemClock().now()
    served = await store.served_apps(alive_since=now - ALIVE_WITHIN)
    for app in apps:
        if app not in served and models.DEBUG_MARK in app:
            print(
                f"kaiju-tasks: warning: no live debug executor serves queue {app!r}: the manager"
                " fails its tasks (reason debug_executor_gone); start `kaiju-tasks executor"
                " --debug` and use the queue it prints",
                file=sys.stderr,
            )
        elif app not in served:
            print(
                f"kaiju-tasks: warning: no live executor serves app {app!r}: its tasks stay "
                "queued until one does, and fail when their deadline passes; start one with "
                f"`kaiju-tasks executor --app {shlex.quote(app)}`",
                file=sys.stderr,
            )


def _print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _config(settings: config.Settings, sources: dict[str, str], args: argparse.Namespace) -> int:
    """Print every option with its value and where it came from; secrets masked."""
    import dataclasses as dc

    shown: dict[str, dict[str, Any]] = {}
    for section in ("database", "server", "executor", "manager", "logging"):
        values = dc.asdict(getattr(settings, section))
        for option, value in values.items():
            key = f"{section}.{option}"
            if (section, option) in config.SECRET_OPTIONS and value:
                value = config.mask(str(value))
            shown[key] = {"value": value, "source": sources.get(key, "default")}
    for app, url in settings.apps.items():
        size = settings.app_batch.get(app)
        shown[f"apps.{app}"] = {
            "value": config.mask(url) + (f" batch={size}" if size else ""),
            "source": sources.get(f"apps.{app}", "default"),
        }
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        width = max(len(k) for k in shown)
        for key, item in shown.items():
            print(f"{key:<{width}}  {item['value']!s:<40}  ({item['source']})")
    return 0


def _events(settings: config.Settings, args: argparse.Namespace) -> int:
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

    with database(settings) as dsn:
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

    from kaiju_tasks import monitor
    from kaiju_tasks.metrics import ALIVE_WITHIN

    def ago(value: str | None) -> str:
        if not value:
            return ""
        seconds = (now - datetime.fromisoformat(value)).total_seconds()
        return f"{seconds:.0f}s ago" if seconds >= 0 else "now"

    workers = Table(title="executors", title_justify="left")
    for column in ("executor", "host", "apps", "running", "heartbeat", "state"):
        workers.add_column(column)
    for w in snapshot["workers"]:
        alive = (
            w["stopped_at"] is None
            and now - datetime.fromisoformat(w["heartbeat_at"]) < ALIVE_WITHIN
        )
        workers.add_row(
            w["id"],
            w["host"],
            ",".join(w["apps"]),
            f"{w['running']}/{w['concurrency']}",
            ago(w["heartbeat_at"]),
            ("online" if alive else "offline") + (" (debug)" if w.get("debug") else ""),
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
        counts.add_row(c["app_name"], c["status"], str(c["n"]))
    queued = {c["app_name"]: c["n"] for c in snapshot["counts"] if c["status"] == "QUEUED"}
    lost = monitor.unserved(queued, snapshot["workers"], alive_since=now - ALIVE_WITHIN)
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


def _top(settings: config.Settings, args: argparse.Namespace) -> int:
    """Refresh a view of the cluster every ``--interval`` seconds until Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    clock = SystemClock()

    async def watch(dsn: str) -> None:
        async with engine_store(settings, dsn, "kaiju-tasks-cli") as store:

            async def view() -> Any:
                now = clock.now()
                snapshot = await store.top(
                    heard_since=now - timedelta(minutes=10), limit=args.limit
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

    with database(settings) as dsn:
        asyncio.run(watch(dsn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
