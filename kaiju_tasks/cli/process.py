"""The long-running commands: ``migrate``, ``executor``, ``manager``, ``server`` and ``run``.

Each reads its settings, lets its own options replace the configured values, and has
:mod:`kaiju_tasks.wiring` build the components it runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from kaiju_tasks import config, errors, methods, wiring
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager
from kaiju_tasks.service import TaskService, TokenService
from kaiju_tasks.store import migrate as migrate_

logger = logging.getLogger(__name__)

SettingsT = TypeVar("SettingsT")


def given(conf: SettingsT, **options: Any) -> SettingsT:
    """``conf`` with the command-line options that were given (not None) replacing its values."""
    return dataclasses.replace(conf, **{k: v for k, v in options.items() if v is not None})  # type: ignore[type-var]


def migrate(settings: config.Settings) -> int:
    """``migrate``: apply pending migrations on the direct DSN."""
    with wiring.database(settings) as dsn:
        applied: list[Any] = asyncio.run(migrate_.migrate(dsn))
    print(json.dumps({"applied": applied}) if applied else "database is up to date")
    return 0


def _executor(
    settings: config.Settings,
    args: argparse.Namespace,
    dsn: str,
    store: Any,
    sources: Mapping[str, str],
) -> Executor:
    apps, urls, batch = wiring.served_apps(settings, args.app, sources)
    conf = given(
        settings.executor,
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        shutdown_grace=args.shutdown_grace,
        heartbeat_interval=args.heartbeat,
        lease=args.lease,
        poll_interval=args.poll,
    )
    return wiring.build_executor(
        store,
        dsn,
        apps=apps,
        methods=wiring.load_methods(args.methods),
        app_urls=urls,
        app_batch=batch,
        executor_id=args.id,
        debug=args.debug,
        **wiring.executor_options(conf),
    )


def _manager(settings: config.Settings, args: argparse.Namespace, dsn: str, store: Any) -> Manager:
    conf = given(
        settings.manager,
        interval=args.interval,
        stale_after=args.stale_after,
        standby_interval=args.standby_interval,
    )
    if args.disable_scheduler and args.disable_gc:
        raise errors.ConfigError("--disable-gc with --disable-scheduler leaves nothing to do")
    return wiring.build_manager(
        store,
        dsn,
        scheduler=not args.disable_scheduler,
        gc=not args.disable_gc,
        **wiring.manager_options(conf),
    )


def _http(settings: config.Settings, args: argparse.Namespace) -> config.ServerSettings:
    """``[server]`` with ``--host`` (when not empty) and ``--port`` replacing its values."""
    return given(settings.server, host=args.host or None, port=args.port)


def _announce(http: wiring.HttpServer) -> None:
    print(f"kaiju-tasks API on {http.url}", flush=True)
    print(f"dashboard on {http.root} (log in with an API token)", flush=True)


def _stop_event() -> asyncio.Event:
    """An event SIGINT and SIGTERM set."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


def serve(settings: config.Settings, component: str, build: Callable[[str, Any], Any]) -> int:
    """Run the component ``build(dsn, store)`` returns until SIGINT or SIGTERM, then stop it."""

    async def run(dsn: str) -> None:
        async with wiring.engine_store(settings, dsn, component) as store:
            running = build(dsn, store)
            stop = _stop_event()
            async with running:
                if isinstance(running, wiring.HttpServer):
                    _announce(running)
                print(f"kaiju-tasks {component.removeprefix('kaiju-tasks-')} running", flush=True)
                for app, queue in getattr(running, "debug_queues", {}).items():
                    print(f"debug queue for {app}: {queue}", flush=True)
                await stop.wait()

    with wiring.database(settings) as dsn:
        asyncio.run(run(dsn))
    return 0


def executor(
    settings: config.Settings, args: argparse.Namespace, sources: Mapping[str, str]
) -> int:
    """``executor``: claim and run the tasks of the served apps."""
    return serve(
        settings,
        "kaiju-tasks-executor",
        lambda dsn, store: _executor(settings, args, dsn, store, sources),
    )


def manager(settings: config.Settings, args: argparse.Namespace) -> int:
    """``manager``: compete for the leadership and run the duties while leading."""
    return serve(
        settings, "kaiju-tasks-manager", lambda dsn, store: _manager(settings, args, dsn, store)
    )


def server(settings: config.Settings, args: argparse.Namespace) -> int:
    """``server``: the HTTP JSON-RPC API, the dashboard and ``/metrics``."""
    return serve(
        settings,
        "kaiju-tasks-server",
        lambda dsn, store: wiring.http_server(_http(settings, args), store, dsn, methods.Methods()),
    )


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


def run(settings: config.Settings, args: argparse.Namespace, sources: Mapping[str, str]) -> int:
    """``run``: everything in one process, until Ctrl-C."""

    async def serve(dsn: str) -> None:
        from kaiju_tasks import demo

        await migrate_.migrate(dsn)
        registry = wiring.load_methods(args.methods)
        apps, urls, batch = wiring.served_apps(settings, args.app, sources)
        if args.demo:
            demo.register(registry)
            for name in registry:
                if name.startswith("demo."):  # the tour calls them with any token
                    registry.set_access(name, public=True)
            if demo.APP not in apps:
                apps.append(demo.APP)
        async with wiring.engine_store(settings, dsn, "kaiju-tasks-run") as store:
            http = wiring.http_server(_http(settings, args), store, dsn, registry)
            stop = _stop_event()
            manager = wiring.build_manager(store, dsn, **wiring.manager_options(settings.manager))
            executor = wiring.build_executor(
                store,
                dsn,
                apps=apps,
                methods=registry,
                app_urls=urls,
                app_batch=batch,
                **wiring.executor_options(settings.executor),
            )
            # The port first: a start that cannot listen (another `run` has it) leaves tokens,
            # executors and tasks as they were.
            async with http:
                _announce(http)
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

    with wiring.database(settings) as dsn:
        asyncio.run(serve(dsn))
    return 0
