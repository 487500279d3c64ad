"""TaskRuntime: run kaiju-tasks inside an application's own asyncio process.

```python
from kaiju_tasks import Task, TaskCommand, TaskRuntime

async with TaskRuntime(dsn, apps=["orders"]) as runtime:

    @runtime.methods.register("orders.delete")
    async def delete_orders(conditions: dict) -> dict:
        ...

    task = await runtime.tasks.create(Task(app="orders", commands=[...]))
```

It opens a pool, applies migrations, and runs an executor for ``apps`` (stages call the
registered methods in-process, or ``app_urls`` over HTTP) and, unless told otherwise, a manager
that competes for leadership with the other managers of the database. With ``dsn=None`` it
starts the embedded PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kaiju_tasks import config, errors, models, wiring
from kaiju_tasks import methods as methods_
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager, steps
from kaiju_tasks.service import NotificationService, TaskService
from kaiju_tasks.store import embedded, migrate, postgres

POOL_MIN = 1
"""Connections the runtime's pool keeps open: it shares the application's process."""


class TaskRuntime:
    """TaskService, NotificationService, an executor and a manager sharing one pool.

    Args:
        dsn: PostgreSQL DSN; None starts the embedded server (data in ``embedded_dir``).
        embedded_dir: the embedded server's data directory. Default: as the ``kaiju-tasks``
            command finds it, from ``KAIJU_TASKS_DATABASE_EMBEDDED_DIR``, else
            ``KAIJU_TASKS_EMBEDDED_DIR``, else the user's data directory; so a script and
            ``kaiju-tasks run`` on one machine share one server.
        direct_dsn: a direct DSN when ``dsn`` is a transaction pooler (PgBouncer with
            ``pool_mode = transaction``): LISTEN, the leadership lock and its duties and
            migrations use it, the pool uses ``dsn`` without prepared statements.
        apps: app names the executor serves (none: no executor).
        methods: in-process methods (a new registry by default: ``runtime.methods``).
        app_urls: ``app_name -> JSON-RPC URL`` for apps served over HTTP.
        executor: run an executor; manager: run a manager (default: unless ``debug``).
        debug: the executor serves private queues ``<app>@debug-<random>`` only (see
            ``debug_queues``), to attach code under development to a production database
            without taking its work; no manager runs unless ``manager=True``.
        apply_migrations: apply pending migrations on start.
        executor_options / manager_options: extra keyword arguments for Executor / Manager.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        direct_dsn: str | None = None,
        apps: Sequence[str] = (models.DEFAULT_APP,),
        methods: methods_.Methods | None = None,
        app_urls: Mapping[str, str] | None = None,
        executor: bool = True,
        manager: bool | None = None,
        debug: bool = False,
        apply_migrations: bool = True,
        embedded_dir: Path | None = None,
        pool_size: int = config.DEFAULT_POOL_MAX,
        executor_options: Mapping[str, Any] | None = None,
        manager_options: Mapping[str, Any] | None = None,
        manager_settings: steps.Settings | None = None,
    ) -> None:
        if direct_dsn is not None and dsn is None:
            raise errors.ConfigError("direct_dsn needs dsn (the transaction pooler's DSN) too")
        self.dsn = dsn
        self.direct_dsn = direct_dsn
        self.apps = list(apps)
        self.methods = methods if methods is not None else methods_.Methods()
        self.app_urls = dict(app_urls or {})
        self.run_executor = executor and bool(self.apps)
        self.run_manager = (not debug) if manager is None else manager
        self.debug = debug
        self.apply_migrations = apply_migrations
        self.embedded_dir = embedded_dir
        self.pool_size = pool_size
        self.executor_options = dict(executor_options or {})
        self.manager_options = dict(manager_options or {})
        self.manager_settings = manager_settings
        self._server: embedded.EmbeddedPostgres | None = None
        self._pool: Any = None
        self.store: postgres.PostgresEngineStore | None = None
        self.tasks: TaskService
        self.notifications: NotificationService
        self.executor: Executor | None = None
        self.manager: Manager | None = None

    async def __aenter__(self) -> TaskRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connect (starting the embedded server if needed), migrate, start the components."""
        if self.dsn is None:
            configured = os.environ.get(config.env_name("database", "embedded_dir"))
            self._server = embedded.EmbeddedPostgres(
                self.embedded_dir or wiring.embedded_data_dir(configured)
            )
            self.dsn = await asyncio.to_thread(self._server.start)
        dsn = self.direct_dsn or self.dsn  # for LISTEN, the leadership and migrations
        if self.apply_migrations:
            await migrate.migrate(dsn)
        database = config.DatabaseSettings(
            dsn=self.dsn, direct_dsn=self.direct_dsn, pool_min=POOL_MIN, pool_max=self.pool_size
        )
        self._pool = await wiring.open_pool(database, dsn, "kaiju-tasks-app")
        self.store = postgres.PostgresEngineStore(self._pool)
        self.tasks = TaskService(self.store)
        self.notifications = NotificationService(self.store)
        if self.run_manager:
            self.manager = wiring.build_manager(
                self.store, dsn, settings=self.manager_settings, **self.manager_options
            )
            await self.manager.start()
        if self.run_executor:
            self.executor = wiring.build_executor(
                self.store,
                dsn,
                apps=self.apps,
                methods=self.methods,
                app_urls=self.app_urls,
                debug=self.debug,
                **self.executor_options,
            )
            await self.executor.start()

    @property
    def debug_queues(self) -> dict[str, str]:
        """In debug mode, ``app -> the private queue`` to give tasks as ``app_name``."""
        return dict(self.executor.debug_queues) if self.executor is not None else {}

    async def stop(self) -> None:
        """Stop the components (handing unfinished tasks back), close the pool."""
        if self.executor is not None:
            await self.executor.stop()
            self.executor = None
        if self.manager is not None:
            await self.manager.stop()
            self.manager = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)
            self._server = None
