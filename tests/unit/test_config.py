"""Configuration layers: each one overrides the one before."""

from __future__ import annotations

import pytest

from kaiju_tasks import config, errors


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def layers(tmp_path):
    etc = _write(tmp_path / "etc.ini", "[database]\ndsn = postgresql://etc/db\npool_max = 3\n")
    home = _write(tmp_path / "home.ini", "[database]\ndsn = postgresql://home/db\n")
    cwd = _write(tmp_path / "cwd.ini", "[logging]\nlevel = DEBUG\n")
    return [etc, home, cwd]


def test_defaults_apply_when_nothing_is_configured(tmp_path):
    settings, sources = config.load(paths=[tmp_path / "missing.ini"], environ={})
    assert settings.database.dsn is None
    assert settings.database.pool_max == config.DEFAULT_POOL_MAX
    assert sources == {}


def test_later_files_override_earlier_ones(layers):
    settings, sources = config.load(paths=layers, environ={})
    assert settings.database.dsn == "postgresql://home/db"
    assert settings.database.pool_max == 3
    assert settings.logging.level == "DEBUG"
    assert sources["database.dsn"] == str(layers[1])


def test_config_path_overrides_default_files(layers, tmp_path):
    extra = _write(tmp_path / "extra.ini", "[database]\ndsn = postgresql://extra/db\n")
    settings, _ = config.load(paths=layers, config_path=extra, environ={})
    assert settings.database.dsn == "postgresql://extra/db"


def test_environment_overrides_files(layers):
    settings, sources = config.load(
        paths=layers,
        environ={
            "KAIJU_TASKS_DATABASE_DSN": "postgresql://env/db",
            "KAIJU_TASKS_APPS_ORDERS": "http://orders:8080/public/rpc",
        },
    )
    assert settings.database.dsn == "postgresql://env/db"
    assert settings.apps == {"orders": "http://orders:8080/public/rpc"}
    assert sources["database.dsn"] == "env KAIJU_TASKS_DATABASE_DSN"


def test_command_line_overrides_environment(layers):
    settings, sources = config.load(
        paths=layers,
        environ={"KAIJU_TASKS_DATABASE_DSN": "postgresql://env/db"},
        overrides={"database": {"dsn": "postgresql://cli/db", "pool_max": None}},
    )
    assert settings.database.dsn == "postgresql://cli/db"
    assert settings.database.pool_max == 3  # None means "not given on the command line"
    assert sources["database.dsn"] == "command line"


def test_test_dsn_variable_is_not_configuration():
    settings, _ = config.load(paths=[], environ={"KAIJU_TASKS_TEST_DSN": "postgresql://t/db"})
    assert settings.database.dsn is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[databse]\ndsn = x\n", r"unknown section \[databse\]"),
        ("[database]\ndns = x\n", r"unknown option 'dns' in \[database\]"),
        ("[database]\npool_max = many\n", "pool_max must be an integer"),
        ("not an ini file", "cannot parse"),
    ],
)
def test_bad_configuration_is_a_clear_error(tmp_path, text, message):
    path = _write(tmp_path / "bad.ini", text)
    with pytest.raises(errors.ConfigError, match=message):
        config.load(paths=[path], environ={})


def test_missing_config_path_is_an_error(tmp_path):
    with pytest.raises(errors.ConfigError, match="does not exist"):
        config.load(paths=[], config_path=tmp_path / "nope.ini", environ={})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"KAIJU_TASKS_LOGGING_LEVEL": "LOUD"}, "level must be one of"),
        ({"KAIJU_TASKS_LOGGING_FORMAT": "xml"}, "format must be text or json"),
        ({"KAIJU_TASKS_DATABASE_POOL_MIN": "0"}, "pool_min <= pool_max"),
        ({"KAIJU_TASKS_DATABASE_POOL_MIN": "20"}, "pool_min <= pool_max"),
        ({"KAIJU_TASKS_APPS_ORDERS": "orders:8080"}, "must be an http"),
        ({"KAIJU_TASKS_EXECUTOR_LEASE": "9"}, "lease must be at least twice heartbeat"),
        ({"KAIJU_TASKS_EXECUTOR_LEASE": "1e9"}, "at most 3600 seconds"),
        ({"KAIJU_TASKS_EXECUTOR_LEASE": "nan"}, r"\[executor\] lease"),
        (
            {"KAIJU_TASKS_EXECUTOR_HEARTBEAT_INTERVAL": "inf"},
            "heartbeat_interval must be > 0 and finite",
        ),
    ],
)
def test_invalid_values_are_refused_with_their_source(environ, message):
    with pytest.raises(errors.ConfigError, match=message) as exc:
        config.load(paths=[], environ=environ)
    assert "env KAIJU_TASKS_" in str(exc.value)


def test_an_empty_value_falls_back_to_the_default():
    settings, sources = config.load(paths=[], environ={"KAIJU_TASKS_LOGGING_LEVEL": ""})
    assert settings.logging.level == "INFO"
    assert "logging.level" not in sources


def test_app_names_keep_their_case_in_files(tmp_path):
    path = _write(tmp_path / "apps.ini", "[apps]\nOrders = http://orders/rpc\n")
    settings, _ = config.load(paths=[path], environ={})
    assert settings.apps == {"Orders": "http://orders/rpc"}


def test_executor_and_manager_sections_take_numbers(tmp_path):
    path = _write(
        tmp_path / "k.ini",
        "[executor]\napps = orders, billing\nconcurrency = 4\n"
        "heartbeat_interval = 0.5\n[manager]\nstale_after = 12.5\n",
    )
    settings, _ = config.load(paths=[path], environ={"KAIJU_TASKS_MANAGER_INTERVAL": "0.2"})
    assert settings.executor.concurrency == 4
    assert settings.executor.heartbeat_interval == 0.5
    assert settings.executor.apps == "orders, billing"
    assert settings.manager.stale_after == 12.5
    assert settings.manager.interval == 0.2


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"KAIJU_TASKS_EXECUTOR_CONCURRENCY": "0"}, "concurrency >= 1"),
        ({"KAIJU_TASKS_EXECUTOR_POLL_INTERVAL": "-1"}, "poll_interval must be > 0"),
        ({"KAIJU_TASKS_MANAGER_INTERVAL": "fast"}, "interval must be a number"),
    ],
)
def test_bad_executor_and_manager_values_are_refused(environ, message):
    with pytest.raises(errors.ConfigError, match=message):
        config.load(paths=[], environ=environ)


def test_server_read_timeouts_and_auth_limits_have_defaults_and_come_from_env(tmp_path):
    settings, _ = config.load(paths=[], environ={})
    server = settings.server
    assert (server.header_timeout, server.body_timeout) == (10.0, 30.0)
    assert (server.auth_failures, server.auth_window, server.auth_clients) == (20, 60.0, 10_000)
    assert server.trusted_proxies is None
    settings, sources = config.load(
        paths=[],
        environ={
            "KAIJU_TASKS_SERVER_HEADER_TIMEOUT": "2.5",
            "KAIJU_TASKS_SERVER_AUTH_FAILURES": "3",
            "KAIJU_TASKS_SERVER_TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
        },
    )
    assert settings.server.header_timeout == 2.5
    assert settings.server.auth_failures == 3
    assert [str(n) for n in config.networks(settings.server.trusted_proxies)] == [
        "10.0.0.0/8",
        "127.0.0.1/32",
    ]
    assert sources["server.header_timeout"] == "env KAIJU_TASKS_SERVER_HEADER_TIMEOUT"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("HEADER_TIMEOUT", "0", r"\[server\] header_timeout must be > 0"),
        ("BODY_TIMEOUT", "-1", r"\[server\] body_timeout must be > 0"),
        ("AUTH_FAILURES", "0", r"\[server\] auth_failures must be at least 1"),
        ("AUTH_CLIENTS", "x", r"\[server\] auth_clients must be an integer"),
        ("TRUSTED_PROXIES", "proxy.local", "'proxy.local' is not an IP address or network"),
    ],
)
def test_bad_server_options_are_refused_naming_them(variable, value, message):
    with pytest.raises(errors.ConfigError, match=message):
        config.load(paths=[], environ={f"KAIJU_TASKS_SERVER_{variable}": value})


def test_an_executor_token_with_an_app_url_holding_a_password_is_refused(tmp_path):
    path = _write(
        tmp_path / "c.ini",
        "[executor]\ntoken = kt_abc\n[apps]\norders = http://svc:hunter2@orders:8080/rpc\n",
    )
    with pytest.raises(errors.ConfigError) as refused:
        config.load(paths=[path], environ={})
    message = str(refused.value)
    assert "app 'orders'" in message
    assert "[executor] token" in message
    assert "hunter2" not in message
    assert "svc:***@orders" in message
    # either one alone is fine
    config.load(paths=[path], environ={"KAIJU_TASKS_EXECUTOR_TOKEN": ""})
    config.load(paths=[path], environ={"KAIJU_TASKS_APPS_ORDERS": "http://orders:8080/rpc"})


def test_an_app_url_refused_for_its_scheme_shows_no_password():
    with pytest.raises(errors.ConfigError) as refused:
        config.load(paths=[], environ={"KAIJU_TASKS_APPS_X": "ftp://u:hunter2@h/"})
    assert "hunter2" not in str(refused.value)
