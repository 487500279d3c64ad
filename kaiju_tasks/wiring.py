"""Composition root: validated settings in, running components out.

The only place that builds the PostgreSQL pool and store, the manager, the executor and the
HTTP API's pieces. Every ``kaiju-tasks`` command and :class:`kaiju_tasks.runtime.TaskRuntime`
go through it, so a setting is turned into a component's argument here and nowhere else:

- :func:`database` and :func:`open_pool` / :func:`engine_store`: the direct DSN (or the
  embedded server) and the pool, through a transaction pooler when ``direct_dsn`` is set;
- :func:`manager_options` / :func:`build_manager`: ``[manager]`` into a :class:`Manager`;
- :func:`executor_options` / :func:`served_apps` / :func:`build_executor`: ``[executor]`` and
  ``[apps]`` into an :class:`Executor`;
- :func:`api`, :func:`web_app`, :class:`HttpServer`, :func:`http_server`: ``[server]`` into the
  JSON-RPC API with the dashboard and ``/metrics``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from kaiju_tasks import clock as clock_
from kaiju_tasks import config, errors, insights, methods
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager, steps
from kaiju_tasks.service import NotificationService, TaskService, TokenService
from kaiju_tasks.store import embedded, migrate, postgres

_DAY = timedelta(days=1)

# -- database ---------------------------------------------------------------------------------


def embedded_data_dir(configured: str | None) -> Path:
    """The embedded server's data directory, as the command and ``TaskRuntime`` both find it.

    ``configured`` (``[database] embedded_dir``), else ``KAIJU_TASKS_EMBEDDED_DIR``, else the
    user's default: so that a script and ``kaiju-tasks run`` share one server.
    """
    return embedded.default_data_dir(configured or os.environ.get(embedded.ENV_DATA_DIR) or None)


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
    server = embedded.EmbeddedPostgres(embedded_data_dir(settings.database.embedded_dir))
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()


async def open_pool(db: config.DatabaseSettings, dsn: str, component: str) -> Any:
    """Open the pool of ``[database]`` (``pool_min`` to ``pool_max`` connections).

    Args:
        db: the database settings.
        dsn: the direct DSN (:func:`database`; the embedded server's when ``db.dsn`` is unset).
            With ``db.direct_dsn`` set the pool goes through the transaction pooler of
            ``db.dsn`` instead, without named prepared statements.
        component: the ``application_name`` shown in ``pg_stat_activity``.
    """
    pooler = bool(db.direct_dsn)
    return await postgres.create_pool(
        db.dsn if pooler and db.dsn else dsn,
        min_size=db.pool_min,
        max_size=db.pool_max,
        application_name=component,
        pooler=pooler,
    )


@contextlib.asynccontextmanager
async def engine_store(
    settings: config.Settings, dsn: str, component: str = "kaiju-tasks"
) -> AsyncIterator[postgres.PostgresEngineStore]:
    """Open the pool and yield the engine store (the schema must be current).

    ``dsn`` is the direct DSN (see :func:`database` and :func:`open_pool`).
    """
    await migrate.check_current(dsn)
    pool = await open_pool(settings.database, dsn, component)
    try:
        yield postgres.PostgresEngineStore(pool)
    finally:
        await pool.close()


# -- manager ----------------------------------------------------------------------------------


def duty_settings(conf: config.ManagerSettings) -> steps.Settings:
    """The duties' tunables from ``[manager]`` (seconds and days become timedeltas)."""
    return steps.Settings(
        batch=conf.batch,
        stale_after=timedelta(seconds=conf.stale_after),
        task_retention=_DAY * conf.task_retention,
        notification_retention=_DAY * conf.notification_retention,
        event_retention=_DAY * conf.event_retention,
        executor_retention=_DAY * conf.executor_retention,
    )


def manager_options(conf: config.ManagerSettings) -> dict[str, Any]:
    """The :class:`Manager` keyword arguments ``[manager]`` sets."""
    return {
        "settings": duty_settings(conf),
        "interval": timedelta(seconds=conf.interval),
        "standby_interval": timedelta(seconds=conf.standby_interval),
        "gc_interval": timedelta(seconds=conf.gc_interval),
    }


def build_manager(store: Any, dsn: str, *, scheduler: bool = True, **options: Any) -> Manager:
    """A manager that competes for the leadership of its duties on the direct DSN ``dsn``.

    Managers with the scheduling duties share one advisory lock; those with garbage
    collection only (``scheduler=False``) another, so one of each kind leads.
    """
    lock = postgres.LEADER_LOCK_KEY if scheduler else postgres.GC_LOCK_KEY
    return Manager(
        store,
        leadership=postgres.AdvisoryLeadership(dsn, lock),
        dsn=dsn,
        scheduler=scheduler,
        **options,
    )


# -- executor ---------------------------------------------------------------------------------


def executor_options(conf: config.ExecutorSettings) -> dict[str, Any]:
    """The :class:`Executor` keyword arguments ``[executor]`` sets (apps aside)."""
    return {
        "concurrency": conf.concurrency,
        "prefetch": conf.prefetch,
        "heartbeat_interval": timedelta(seconds=conf.heartbeat_interval),
        "lease": None if conf.lease is None else timedelta(seconds=conf.lease),
        "poll_interval": timedelta(seconds=conf.poll_interval),
        "shutdown_grace": timedelta(seconds=conf.shutdown_grace),
        "app_token": conf.token,
    }


def served_apps(
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


def load_methods(specs: Sequence[str]) -> methods.Methods:
    """One registry holding the methods of every ``MODULE[:ATTRIBUTE]`` registry named."""
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


def build_executor(store: Any, dsn: str, **options: Any) -> Executor:
    """An executor woken and cancelled through LISTEN on the direct DSN ``dsn``."""
    return Executor(store, dsn=dsn, **options)


# -- HTTP API ---------------------------------------------------------------------------------


class HttpServer:
    """The HTTP API as an ``async with`` component; ``url`` is known once it listens."""

    def __init__(self, app: Any, host: str, port: int, metrics: Any = None) -> None:
        from kaiju_tasks.rpc import server as rpc_server

        self._runner = rpc_server.runner(app)
        self.metrics = metrics
        self.host = host
        self.port = port
        self.url = ""
        self.root = ""

    async def __aenter__(self) -> HttpServer:
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
        self.root = f"http://{host}:{port}/"
        self.url = f"{self.root}public/rpc"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        if self.metrics is not None:
            await self.metrics.stop()


HEALTH_UNSERVED = insights.HEALTH_UNSERVED
"""Most apps ``/health`` lists under ``unserved_apps``."""


def api(
    store: Any, registry: methods.Methods, conf: config.ServerSettings, metrics: Any = None
) -> Any:
    """The :class:`kaiju_tasks.rpc.server.Api` of ``[server]`` over ``store``."""
    from kaiju_tasks.rpc import server as rpc_server

    reads = insights.Insights(store)

    async def health() -> dict[str, Any]:
        return await reads.health(clock_.SystemClock().now())

    return rpc_server.Api(
        tasks=TaskService(store),
        notifications=NotificationService(store),
        tokens=TokenService(store),
        methods=registry,
        health=health,
        max_body=conf.max_body,
        max_batch=conf.max_batch,
        request_timeout=float(conf.request_timeout),
        header_timeout=conf.header_timeout,
        body_timeout=conf.body_timeout,
        auth_failures=conf.auth_failures,
        auth_window=conf.auth_window,
        auth_clients=conf.auth_clients,
        trusted_proxies=config.networks(conf.trusted_proxies),
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


def web_app(rpc_api: Any, store: Any, dsn: str) -> Any:
    """The HTTP API with the dashboard at ``/``."""
    from kaiju_tasks import dashboard
    from kaiju_tasks.rpc import server as rpc_server

    app = rpc_server.create_app(rpc_api)
    data = dashboard.DashboardData(store.pool, dsn)
    tokens = rpc_server.counted_tokens(app)  # the dashboard's failures count too
    dashboard.setup(app, dashboard.Dashboard(rpc_api.tasks, tokens, data))
    return app


def http_server(
    conf: config.ServerSettings, store: Any, dsn: str, registry: methods.Methods
) -> HttpServer:
    """The API of ``[server]`` with the dashboard and ``/metrics``, listening once entered."""
    from kaiju_tasks.metrics import Metrics

    metrics = Metrics(store, dsn)
    app = web_app(api(store, registry, conf, metrics), store, dsn)
    return HttpServer(app, conf.host, conf.port, metrics)
