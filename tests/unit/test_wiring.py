"""kaiju_tasks.wiring: every setting reaches its component, and every default is the component's.

No database: the components are built, not started.
"""

from __future__ import annotations

import dataclasses
import inspect
from datetime import timedelta
from typing import Any

import pytest

from kaiju_tasks import config, errors, methods, wiring
from kaiju_tasks.cli import parser, process
from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager, steps
from kaiju_tasks.rpc import server as rpc_server
from kaiju_tasks.store import postgres

DSN = "postgresql://u@db/x"
NO_STORE: Any = None  # the components are built, never started


class _Metrics:  # what wiring.api reads of kaiju_tasks.metrics.Metrics
    registry: Any = None

    async def render(self) -> bytes:
        return b""


def _other(value: Any) -> Any:
    """A valid value unlike ``value``."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    return None


def _fields(conf, skip=()):
    return [f.name for f in dataclasses.fields(conf) if f.name not in skip]


def _manager(conf: config.ManagerSettings) -> Manager:
    return wiring.build_manager(NO_STORE, DSN, **wiring.manager_options(conf))


def _manager_view(manager: Manager):
    return (
        manager.settings,
        manager.interval,
        manager.gc_interval,
        manager.standby_interval,
        manager.scheduler,
        manager.gc,
    )


def _executor(conf: config.ExecutorSettings) -> Executor:
    return wiring.build_executor(NO_STORE, DSN, **wiring.executor_options(conf))


def _executor_view(executor: Executor):
    return (
        executor.concurrency,
        executor.prefetch,
        executor.poll_interval,
        executor.heartbeat_interval,
        executor.lease,
        executor.shutdown_grace,
        executor.client.token,
    )


def _api(conf: config.ServerSettings) -> rpc_server.Api:
    return wiring.api(NO_STORE, methods.Methods(), conf)


def _api_view(api: rpc_server.Api):
    return {
        f.name: getattr(api, f.name)
        for f in dataclasses.fields(api)
        if not callable(getattr(api, f.name)) and f.name not in ("tasks", "notifications", "tokens")
    }


@pytest.mark.parametrize("name", _fields(config.ManagerSettings))
async def test_every_manager_option_reaches_the_manager(name):
    default = config.ManagerSettings()
    changed = dataclasses.replace(default, **{name: _other(getattr(default, name))})
    assert _manager_view(_manager(changed)) != _manager_view(_manager(default))


@pytest.mark.parametrize("name", _fields(steps.Settings))
async def test_every_duty_tunable_is_a_manager_option(name):
    # The CLI once built steps.Settings field by field and left batch and executor_retention
    # at their defaults whatever was configured.
    default = config.ManagerSettings()
    changed = dataclasses.replace(default, **{name: _other(getattr(default, name))})
    assert getattr(_manager(changed).settings, name) != getattr(steps.Settings(), name)


async def test_manager_options_convert_seconds_and_days():
    conf = config.ManagerSettings(
        interval=3, stale_after=40, batch=7, executor_retention=0.5, task_retention=2
    )
    manager = _manager(conf)
    assert manager.interval == timedelta(seconds=3)
    assert manager.settings.stale_after == timedelta(seconds=40)
    assert manager.settings.batch == 7
    assert manager.settings.executor_retention == timedelta(hours=12)
    assert manager.settings.task_retention == timedelta(days=2)


@pytest.mark.parametrize("name", _fields(config.ExecutorSettings, skip=("apps",)))
async def test_every_executor_option_reaches_the_executor(name):
    default = config.ExecutorSettings()
    value: Any = {"token": "kt_token", "lease": 60.0}.get(name, _other(getattr(default, name)))
    changed = dataclasses.replace(default, **{name: value})
    assert _executor_view(_executor(changed)) != _executor_view(_executor(default))


@pytest.mark.parametrize("name", _fields(config.ServerSettings, skip=("host", "port")))
def test_every_server_option_reaches_the_api(name):
    default = config.ServerSettings()
    value: Any = _other(getattr(default, name)) if name != "trusted_proxies" else "10.0.0.0/8"
    changed = dataclasses.replace(default, **{name: value})
    assert _api_view(_api(changed)) != _api_view(_api(default))


async def test_defaults_are_the_components_own():
    manager, bare_manager = _manager(config.ManagerSettings()), Manager(NO_STORE)
    assert _manager_view(manager) == _manager_view(bare_manager)
    executor, bare_executor = _executor(config.ExecutorSettings()), Executor(NO_STORE)
    assert _executor_view(executor) == _executor_view(bare_executor)
    apps, _, _ = wiring.served_apps(config.Settings(), [], {})
    assert apps == bare_executor.apps
    api = _api(config.ServerSettings())
    bare_api = rpc_server.Api(
        tasks=api.tasks,
        notifications=api.notifications,
        tokens=api.tokens,
        methods=api.methods,
        health=api.health,
    )
    assert _api_view(api) == _api_view(bare_api)
    pool = inspect.signature(postgres.create_pool).parameters
    database = config.DatabaseSettings()
    assert (database.pool_min, database.pool_max) == (
        pool["min_size"].default,
        pool["max_size"].default,
    )


def test_the_api_counts_refused_authentications_on_the_metrics_registry():
    from prometheus_client import CollectorRegistry

    metrics = _Metrics()
    metrics.registry = CollectorRegistry()
    api = wiring.api(NO_STORE, methods.Methods(), config.ServerSettings(), metrics)
    assert api.metrics is not None
    assert api.on_auth_refused is not None
    api.on_auth_refused("invalid")
    assert metrics.registry.get_sample_value(
        "kaiju_tasks_auth_refused_total", {"reason": "invalid"}
    ) == pytest.approx(1)


@pytest.mark.parametrize(
    ("database", "pool_dsn", "pooler"),
    [
        (config.DatabaseSettings(dsn=DSN, pool_min=3, pool_max=4), DSN, False),
        (
            config.DatabaseSettings(
                dsn="postgresql://u@bouncer/x", direct_dsn=DSN, pool_min=3, pool_max=4
            ),
            "postgresql://u@bouncer/x",
            True,
        ),
    ],
)
async def test_the_pool_goes_through_the_transaction_pooler_when_a_direct_dsn_is_set(
    monkeypatch, database, pool_dsn, pooler
):
    opened = []

    async def create_pool(dsn, **options):
        opened.append((dsn, options))
        return "pool"

    monkeypatch.setattr(postgres, "create_pool", create_pool)
    assert await wiring.open_pool(database, DSN, "kaiju-tasks-test") == "pool"
    assert opened == [
        (
            pool_dsn,
            {
                "min_size": 3,
                "max_size": 4,
                "application_name": "kaiju-tasks-test",
                "pooler": pooler,
            },
        )
    ]


def _settings(**environ):
    settings, sources = config.load(paths=[], environ=environ)
    return settings, sources


async def test_the_manager_command_passes_every_configured_value_and_its_options_on():
    settings, _ = _settings(
        KAIJU_TASKS_MANAGER_BATCH="7",
        KAIJU_TASKS_MANAGER_EXECUTOR_RETENTION="2",
        KAIJU_TASKS_MANAGER_GC_INTERVAL="60",
        KAIJU_TASKS_MANAGER_INTERVAL="5",
    )
    args = parser.build().parse_args(["manager", "--interval", "3", "--stale-after", "40"])
    manager = process._manager(settings, args, DSN, NO_STORE)
    assert manager.settings.batch == 7
    assert manager.settings.executor_retention == timedelta(days=2)
    assert manager.gc_interval == timedelta(seconds=60)
    assert manager.interval == timedelta(seconds=3)  # the option wins over the setting
    assert manager.settings.stale_after == timedelta(seconds=40)
    assert manager.scheduler
    assert manager.gc
    assert isinstance(manager.leadership, postgres.AdvisoryLeadership)
    assert manager.leadership.key == postgres.LEADER_LOCK_KEY
    assert manager.leadership.dsn == DSN


async def test_a_manager_without_the_scheduler_competes_for_the_collector_lock():
    settings, _ = _settings()
    args = parser.build().parse_args(["manager", "--disable-scheduler"])
    manager = process._manager(settings, args, DSN, NO_STORE)
    assert not manager.scheduler
    assert isinstance(manager.leadership, postgres.AdvisoryLeadership)
    assert manager.leadership.key == postgres.GC_LOCK_KEY
    both = parser.build().parse_args(["manager", "--disable-scheduler", "--disable-gc"])
    with pytest.raises(errors.ConfigError, match="leaves nothing to do"):
        process._manager(settings, both, DSN, NO_STORE)


async def test_the_executor_command_passes_every_configured_value_and_its_options_on():
    settings, sources = _settings(
        KAIJU_TASKS_EXECUTOR_HEARTBEAT_INTERVAL="2",
        KAIJU_TASKS_EXECUTOR_PREFETCH="0",
        KAIJU_TASKS_EXECUTOR_TOKEN="kt_token",
        KAIJU_TASKS_APPS_ORDERS="http://orders/rpc batch=5",
    )
    args = parser.build().parse_args(
        ["executor", "--concurrency", "3", "--poll", "0.5", "--id", "ex-1"]
    )
    executor = process._executor(settings, args, DSN, NO_STORE, sources)
    assert executor.concurrency == 3
    assert executor.prefetch == 0
    assert executor.heartbeat_interval == timedelta(seconds=2)
    assert executor.poll_interval == timedelta(seconds=0.5)
    assert executor.shutdown_grace == timedelta(seconds=config.ExecutorSettings().shutdown_grace)
    assert executor.client.token == "kt_token"
    assert executor.id == "ex-1"
    assert executor.apps == ["default", "orders"]
    assert executor.app_urls == {"orders": "http://orders/rpc"}
    assert set(executor._call_batches) == {"orders"}


def test_the_server_options_replace_the_configured_address():
    settings, _ = _settings(KAIJU_TASKS_SERVER_HOST="0.0.0.0", KAIJU_TASKS_SERVER_MAX_BATCH="5")
    conf = process._http(settings, parser.build().parse_args(["server", "--port", "0"]))
    assert (conf.host, conf.port, conf.max_batch) == ("0.0.0.0", 0, 5)
    conf = process._http(settings, parser.build().parse_args(["run", "--host", "::1"]))
    assert (conf.host, conf.port) == ("::1", config.DEFAULT_PORT)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"KAIJU_TASKS_MANAGER_BATCH": "0"}, r"\[manager\] batch must be at least 1"),
        ({"KAIJU_TASKS_MANAGER_BATCH": "many"}, r"\[manager\] batch must be an integer"),
        ({"KAIJU_TASKS_MANAGER_EXECUTOR_RETENTION": "0"}, r"executor_retention must be > 0"),
    ],
)
def test_the_batch_and_executor_retention_options_are_checked(environ, message):
    with pytest.raises(errors.ConfigError, match=message):
        config.load(paths=[], environ=environ)
