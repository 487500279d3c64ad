"""Typed settings, layered loading and ``DEFAULT_*`` constants.

Layers, each overriding the one before:

1. ``/etc/kaiju-tasks/kaiju-tasks.ini``
2. ``~/.config/kaiju-tasks/kaiju-tasks.ini``
3. ``./kaiju-tasks.ini``
4. the file given with ``--config-path``
5. environment variables ``KAIJU_TASKS_<SECTION>_<OPTION>`` (e.g. ``KAIJU_TASKS_DATABASE_DSN``,
   ``KAIJU_TASKS_APPS_ORDERS=http://orders:8080/public/rpc``)
6. command-line options

:func:`load` returns the effective :class:`Settings` and where each value came from.
"""

from __future__ import annotations

import configparser
import dataclasses
import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kaiju_tasks import defaults, errors, limits, models, redact

ENV_PREFIX = "KAIJU_TASKS_"
# The defaults are written once, in kaiju_tasks.defaults; the settings below start from them
# (a config value in seconds or days, a component's a timedelta).
DEFAULT_POOL_MIN = defaults.POOL_MIN
DEFAULT_POOL_MAX = defaults.POOL_MAX
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
_DAY = timedelta(days=1)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def env_name(section: str, option: str) -> str:
    """The environment variable that sets ``[section] option``."""
    return f"{ENV_PREFIX}{section}_{option}".upper()


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseSettings:
    """``[database]``."""

    dsn: str | None = None
    """PostgreSQL DSN. Empty: start the embedded server in ``embedded_dir``."""
    embedded_dir: str | None = None
    """Data directory of the embedded server (default: per-user data dir)."""
    pool_min: int = DEFAULT_POOL_MIN
    """Connections kept open per process."""
    pool_max: int = DEFAULT_POOL_MAX
    """Most connections per process."""
    direct_dsn: str | None = None
    """A direct connection to PostgreSQL when ``dsn`` points at a transaction pooler
    (PgBouncer, ``pool_mode = transaction``): LISTEN, the leadership lock and the leader's
    duties, event following and migrations use it; the pools use ``dsn`` without prepared
    statements, each statement in a transaction of its own. Empty: ``dsn`` is direct."""


@dataclasses.dataclass(frozen=True, slots=True)
class LoggingSettings:
    """``[logging]``."""

    level: str = "INFO"
    """Python logging level name."""
    format: str = "text"
    """``text`` for people, ``json`` for one JSON object per line."""


@dataclasses.dataclass(frozen=True, slots=True)
class ServerSettings:
    """``[server]``."""

    host: str = DEFAULT_HOST
    """Address the HTTP API listens on (0.0.0.0 for every interface)."""
    port: int = DEFAULT_PORT
    """TCP port of the HTTP API."""
    max_body: int = defaults.SERVER_MAX_BODY
    """Largest request body accepted, in bytes; larger ones get HTTP 413."""
    max_batch: int = defaults.SERVER_MAX_BATCH
    """Most calls in one JSON-RPC batch."""
    request_timeout: int = int(defaults.SERVER_REQUEST_TIMEOUT)
    """Seconds one call may take before it is answered with a timeout error."""
    header_timeout: float = defaults.SERVER_HEADER_TIMEOUT
    """Seconds a connection has to send a complete request head, from when it connects or from
    its previous response; also how long an idle keep-alive connection is kept."""
    body_timeout: float = defaults.SERVER_BODY_TIMEOUT
    """Seconds a request has to send its whole body once its head arrived (HTTP 408 beyond)."""
    auth_failures: int = defaults.SERVER_AUTH_FAILURES
    """Failed authentications one client address may make at once (HTTP 429 beyond)."""
    auth_window: float = defaults.SERVER_AUTH_WINDOW
    """Seconds in which an address earns back ``auth_failures`` tries."""
    auth_clients: int = defaults.SERVER_AUTH_CLIENTS
    """Most client addresses whose failures are remembered at once."""
    trusted_proxies: str | None = None
    """Comma-separated addresses or networks (CIDR) of proxies whose ``X-Forwarded-For`` is
    believed; unset: the peer address is the client."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExecutorSettings:
    """``[executor]``."""

    apps: str = models.DEFAULT_APP
    """Comma-separated app names whose tasks the executor claims."""
    concurrency: int = defaults.EXECUTOR_CONCURRENCY
    """Tasks run at once."""
    prefetch: int = defaults.EXECUTOR_PREFETCH
    """The most tasks claimed ahead of free slots (0: none). The executor claims ahead only as
    many as its slots free during one claim, by the call and claim times it measures."""
    heartbeat_interval: float = defaults.EXECUTOR_HEARTBEAT_INTERVAL.total_seconds()
    """Seconds between liveness records (keep it well under [manager] stale_after)."""
    lease: float | None = None
    """Seconds after its last recorded heartbeat the executor may still start stage calls
    (default: three heartbeat intervals; at least two). The manager rescues its tasks no
    earlier, whatever its stale_after."""
    poll_interval: float = defaults.EXECUTOR_POLL_INTERVAL.total_seconds()
    """Longest seconds between claims when no notification arrives."""
    shutdown_grace: float = defaults.EXECUTOR_SHUTDOWN_GRACE.total_seconds()
    """Seconds running stages get to finish on stop before their tasks are handed back."""
    token: str | None = None
    """Bearer token sent with stage calls to app URLs (e.g. another kaiju-tasks server)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ManagerSettings:
    """``[manager]``."""

    interval: float = defaults.MANAGER_INTERVAL.total_seconds()
    """Seconds between ticks (timers, deadlines, cron, rescues)."""
    stale_after: float = defaults.STALE_AFTER.total_seconds()
    """Seconds of executor silence after which its tasks are re-queued."""
    standby_interval: float = defaults.MANAGER_STANDBY_INTERVAL.total_seconds()
    """Seconds between a standby's attempts to take the leadership."""
    gc_interval: float = defaults.MANAGER_GC_INTERVAL.total_seconds()
    """Seconds between garbage collections."""
    task_retention: float = defaults.TASK_RETENTION / _DAY
    """Days ended tasks (not cron, not system, not chained to) are kept."""
    notification_retention: float = defaults.NOTIFICATION_RETENTION / _DAY
    """Days notifications are kept."""
    event_retention: float = defaults.EVENT_RETENTION / _DAY
    """Days events are kept."""
    executor_retention: float = defaults.EXECUTOR_RETENTION / _DAY
    """Days an executor silent this long is kept before its row is deleted."""
    batch: int = defaults.MANAGER_BATCH
    """Most rows one duty handles per tick (garbage collection deletes ten times as many per
    round)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """The effective configuration."""

    database: DatabaseSettings = dataclasses.field(default_factory=DatabaseSettings)
    logging: LoggingSettings = dataclasses.field(default_factory=LoggingSettings)
    server: ServerSettings = dataclasses.field(default_factory=ServerSettings)
    executor: ExecutorSettings = dataclasses.field(default_factory=ExecutorSettings)
    manager: ManagerSettings = dataclasses.field(default_factory=ManagerSettings)
    limits: limits.Limits = dataclasses.field(default_factory=limits.Limits)
    """``[limits]``: the bounds on user-controlled input (see :mod:`kaiju_tasks.limits`)."""
    apps: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """``[apps]``: app name -> JSON-RPC URL that runs its stages over HTTP."""
    app_batch: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """``[apps]`` ``batch=N``: app name -> most stage calls sent in one JSON-RPC batch."""


MAX_CALL_BATCH = 1000
"""Most calls an ``[apps]`` ``batch=N`` may gather in one request."""


def parse_app(app: str, value: str, source: str | None = None) -> tuple[str, int]:
    """Split an ``[apps]`` value ``URL [batch=N]`` into the URL and the batch size (0: off)."""
    parts = str(value).split()
    if not parts:
        return "", 0
    url, batch = parts[0], 0
    where = f" (from {source})" if source else ""
    for option in parts[1:]:
        key, equals, raw = option.partition("=")
        if key != "batch" or not equals:
            # Quoted only when it looks like an option: text after a space may be the rest of
            # a URL whose password holds a space.
            shown = repr(option) if re.fullmatch(r"[a-z_]{1,32}=\w{0,32}", option) else "text"
            raise errors.ConfigError(
                f"[apps] {app}: unknown option {shown} after the URL; known: batch=N" + where
            )
        try:
            batch = int(raw)
        except ValueError:
            raise errors.ConfigError(
                f"[apps] {app}: batch must be an integer, got {raw[:64]!r}" + where
            ) from None
        if not 1 <= batch <= MAX_CALL_BATCH:
            raise errors.ConfigError(
                f"[apps] {app}: batch must be 1-{MAX_CALL_BATCH}, got {batch}" + where
            )
    return url, batch


_SECTIONS: dict[str, type[Any]] = {
    "database": DatabaseSettings,
    "logging": LoggingSettings,
    "server": ServerSettings,
    "executor": ExecutorSettings,
    "manager": ManagerSettings,
    "limits": limits.Limits,
}
SECRET_OPTIONS = frozenset({("database", "dsn"), ("database", "direct_dsn"), ("executor", "token")})


def mask(value: str) -> str:
    """Hide the secrets of a URL or DSN (:func:`kaiju_tasks.redact.url`), or a whole secret."""
    if "://" in value or "=" in value:
        return redact.url(value)
    return redact.MASK


def default_paths(cwd: Path | None = None, home: Path | None = None) -> list[Path]:
    """Return the configuration files read before ``--config-path``, lowest priority first."""
    cwd = cwd or Path.cwd()
    home = home or Path.home()
    return [
        Path("/etc/kaiju-tasks/kaiju-tasks.ini"),
        home / ".config" / "kaiju-tasks" / "kaiju-tasks.ini",
        cwd / "kaiju-tasks.ini",
    ]


def _convert(section: str, option: str, raw: str, kind: type[Any], source: str) -> Any:
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise errors.ConfigError(
                f"[{section}] {option} must be {'an integer' if kind is int else 'a number'}, "
                f"got {raw!r} (from {source})"
            ) from None
    return raw or None if kind is str else raw  # an empty value means "not set"


def load(
    *,
    paths: Sequence[Path] | None = None,
    config_path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Load the layers; return the settings and ``{"section.option": source}``."""
    import os

    values: dict[str, dict[str, Any]] = {name: {} for name in (*_SECTIONS, "apps")}
    sources: dict[str, str] = {}

    def put(section: str, option: str, value: Any, source: str) -> None:
        section = section.lower()
        if section != "apps":  # app names are case-sensitive; env names arrive lowercased
            option = option.lower()
        if section == "apps":
            values["apps"][option] = value
        else:
            kind = _SECTIONS.get(section)
            if kind is None:
                raise errors.ConfigError(f"unknown section [{section}] (from {source})")
            fields = {f.name: f for f in dataclasses.fields(kind)}
            if option not in fields:
                raise errors.ConfigError(
                    f"unknown option {option!r} in [{section}] (from {source}); "
                    f"known: {', '.join(fields)}"
                )
            annotation = str(fields[option].type)
            field_type = str if "str" in annotation else float if "float" in annotation else int
            if isinstance(value, str):
                value = _convert(section, option, value, field_type, source)
            if value is None:  # empty: back to the default
                values[section].pop(option, None)
                sources.pop(f"{section}.{option}", None)
                return
            values[section][option] = value
        sources[f"{section}.{option}"] = source

    files = list(paths if paths is not None else default_paths())
    if config_path is not None:
        if not config_path.is_file():
            raise errors.ConfigError(f"configuration file {config_path} does not exist")
        files.append(config_path)
    for path in files:
        if not path.is_file():
            continue
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            parser.read(path, encoding="utf-8")
        except configparser.Error as exc:
            raise errors.ConfigError(f"cannot parse {path}: {exc}") from exc
        for section in parser.sections():
            for option, value in parser.items(section):
                put(section, option, value, str(path))

    env = os.environ if environ is None else environ
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key.startswith(f"{ENV_PREFIX}TEST_"):
            continue
        rest = key[len(ENV_PREFIX) :].lower()
        section, _, option = rest.partition("_")
        if section in (*_SECTIONS, "apps") and option:
            put(section, option, value, f"env {key}")

    for section, options in (overrides or {}).items():
        for option, value in options.items():
            if value is not None:
                put(section, option, value, "command line")

    settings = Settings(
        database=DatabaseSettings(**values["database"]),
        logging=LoggingSettings(**values["logging"]),
        server=ServerSettings(**values["server"]),
        executor=ExecutorSettings(**values["executor"]),
        manager=ManagerSettings(**values["manager"]),
        limits=_limits(values["limits"], sources),
        **_apps(values["apps"], sources),
    )
    _check(settings, sources)
    return settings, sources


def _apps(values: Mapping[str, Any], sources: Mapping[str, str]) -> dict[str, Any]:
    urls: dict[str, str] = {}
    batch: dict[str, int] = {}
    for app, value in values.items():
        urls[app], size = parse_app(app, value, sources.get(f"apps.{app}"))
        if size > 1:
            batch[app] = size
    return {"apps": urls, "app_batch": batch}


def _limits(values: Mapping[str, Any], sources: Mapping[str, str]) -> limits.Limits:
    for name, value in values.items():
        if value < 1:
            source = sources.get(f"limits.{name}")
            raise errors.ConfigError(
                f"[limits] {name} must be at least 1" + (f" (from {source})" if source else "")
            )
    return limits.Limits(**values)


def _check(settings: Settings, sources: Mapping[str, str]) -> None:
    def where(key: str) -> str:
        return f" (from {sources[key]})" if key in sources else ""

    level = settings.logging.level
    if str(level).upper() not in LOG_LEVELS:
        raise errors.ConfigError(
            f"[logging] level must be one of {', '.join(LOG_LEVELS)}, got {level!r}"
            + where("logging.level")
        )
    if settings.logging.format not in ("text", "json"):
        raise errors.ConfigError(
            f"[logging] format must be text or json, got {settings.logging.format!r}"
            + where("logging.format")
        )
    db = settings.database
    if db.pool_min < 1 or db.pool_max < db.pool_min:
        raise errors.ConfigError(
            f"[database] needs 1 <= pool_min <= pool_max, got {db.pool_min} and {db.pool_max}"
            + (where("database.pool_min") or where("database.pool_max"))
        )
    if db.direct_dsn and not db.dsn:
        raise errors.ConfigError(
            "[database] direct_dsn needs dsn (the transaction pooler's DSN) too"
            + where("database.direct_dsn")
        )
    server = settings.server
    if not 0 <= server.port <= 65535:
        raise errors.ConfigError(
            f"[server] port must be 0-65535, got {server.port}" + where("server.port")
        )
    for name in ("max_body", "max_batch", "request_timeout", "auth_failures", "auth_clients"):
        if getattr(server, name) < 1:
            raise errors.ConfigError(
                f"[server] {name} must be at least 1" + where(f"server.{name}")
            )
    for name in ("header_timeout", "body_timeout", "auth_window"):
        if getattr(server, name) <= 0:
            raise errors.ConfigError(f"[server] {name} must be > 0" + where(f"server.{name}"))
    try:
        networks(server.trusted_proxies)
    except ValueError as exc:
        raise errors.ConfigError(
            f"[server] trusted_proxies: {exc}" + where("server.trusted_proxies")
        ) from None
    if settings.manager.batch < 1:
        raise errors.ConfigError("[manager] batch must be at least 1" + where("manager.batch"))
    executor = settings.executor
    if executor.concurrency < 1 or executor.prefetch < 0:
        raise errors.ConfigError(
            "[executor] needs concurrency >= 1 and prefetch >= 0"
            + (where("executor.concurrency") or where("executor.prefetch"))
        )
    if executor.lease is not None and not (
        2 * executor.heartbeat_interval <= executor.lease <= defaults.MAX_LEASE.total_seconds()
    ):
        raise errors.ConfigError(
            "[executor] lease must be at least twice heartbeat_interval and at most"
            f" {defaults.MAX_LEASE.total_seconds():g} seconds"
            + (where("executor.lease") or where("executor.heartbeat_interval"))
        )
    for section in (settings.executor, settings.manager):
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if isinstance(value, float) and not (0 < value < math.inf):
                name = f"{type(section).__name__.removesuffix('Settings').lower()}.{field.name}"
                raise errors.ConfigError(
                    f"[{name.replace('.', '] ')} must be > 0 and finite" + where(name)
                )
    for app, url in settings.apps.items():
        if not str(url).startswith(("http://", "https://")):
            raise errors.ConfigError(
                f"[apps] {app} must be an http(s) URL, got {redact.url(str(url))!r}"
                + where(f"apps.{app}")
            )
    if settings.executor.token:
        check_app_credentials(settings.apps, sources)


def check_app_credentials(apps: Mapping[str, str], sources: Mapping[str, str]) -> None:
    """Refuse an app URL holding a user or password when ``[executor] token`` is set.

    A stage call carries one ``Authorization`` header: the token's or the URL's credentials,
    not both.
    """
    for app, url in apps.items():
        try:
            parts = urlsplit(str(url))
            has_user = parts.username is not None or parts.password is not None
        except ValueError:
            continue
        if has_user:
            source = sources.get(f"apps.{app}")
            raise errors.ConfigError(
                f"app {app!r}: its URL {redact.url(str(url))} holds a user and password, and "
                "[executor] token is set; a stage call carries only one Authorization header: "
                "remove the credentials from the URL or unset the token"
                + (f" (from {source})" if source else "")
            )


def networks(text: str | None) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse ``[server] trusted_proxies``: comma-separated addresses or CIDR networks."""
    found = []
    for item in (text or "").split(","):
        if item.strip():
            try:
                found.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"{item.strip()!r} is not an IP address or network (e.g. 10.0.0.0/8)"
                ) from None
    return tuple(found)
