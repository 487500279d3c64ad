"""What a new user meets first, as subprocesses: ``run``'s token, unserved apps, quiet commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.acceptance.test_cli import Running, cli, post

pytestmark = pytest.mark.timeout(180)

LIST = {"jsonrpc": "2.0", "id": 1, "method": "tasks.list", "params": {"columns": ["id"]}}


def _query(dsn, sql, *args):
    async def run():
        connection = await asyncpg.connect(dsn)
        try:
            return await connection.fetch(sql, *args)
        finally:
            await connection.close()

    return asyncio.run(run())


def _run_tokens(dsn):
    rows = json.loads(cli("--dsn", dsn, "token", "list", "--json").stdout)
    return [r for r in rows if r["name"] == "kaiju-tasks run"]


def test_a_second_run_on_a_busy_port_changes_nothing(dsn, tmp_path):
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    first = Running("--dsn", dsn, "run", "--port", "0", env=state)
    try:
        url = first.wait_for("kaiju-tasks API on ")
        token = first.wait_for("system token: ")
        first.wait_for("kaiju-tasks running")
        port = url.split("//")[1].split("/")[0].rsplit(":", 1)[1]
        executors_before = _query(dsn, "SELECT id FROM executors")
        second = cli("--dsn", dsn, "run", "--port", port, env=state)
        assert second.returncode == 1
        assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
        assert "system token" not in second.stdout
        assert "Traceback" not in second.stderr
        # the running server still answers its printed token
        assert "result" in post(url, LIST, token)
        # no token revoked, none created; no executor of the failed start registered
        assert [(t["revoked_at"], t["permissions"]) for t in _run_tokens(dsn)] == [
            (None, ["system"])
        ]
        assert _query(dsn, "SELECT id FROM executors") == executors_before
    finally:
        first.interrupt()
        first.close()


def test_run_prints_the_same_token_after_a_restart_kept_in_a_private_file(dsn, tmp_path):
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    first = Running("--dsn", dsn, "run", "--port", "0", env=state)
    try:
        token = first.wait_for("system token: ")
        kept = Path(first.wait_for("system token file: ").split(" (")[0])
        first.wait_for("kaiju-tasks running")
        assert first.interrupt() == 0
    finally:
        first.close()
    assert kept.is_relative_to(tmp_path / "state" / "kaiju-tasks")
    assert kept.read_text().strip() == token
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    again = Running("--dsn", dsn, "run", "--port", "0", env=state)
    try:
        url = again.wait_for("kaiju-tasks API on ")
        assert again.wait_for("system token: ") == token
        again.wait_for("kaiju-tasks running")
        assert "result" in post(url, LIST, token)  # the saved token works on the new start
        assert len(_run_tokens(dsn)) == 1
    finally:
        again.interrupt()
        again.close()


def test_run_makes_a_new_token_when_the_saved_one_was_revoked_or_is_readable_by_others(
    dsn, tmp_path
):
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    tokens = []
    for step in range(3):
        run = Running("--dsn", dsn, "run", "--port", "0", env=state)
        try:
            url = run.wait_for("kaiju-tasks API on ")
            tokens.append(run.wait_for("system token: "))
            kept = Path(run.wait_for("system token file: ").split(" (")[0])
            run.wait_for("kaiju-tasks running")
            assert "result" in post(url, LIST, tokens[-1])
            assert run.interrupt() == 0
        finally:
            run.close()
        if step == 0:
            (revoked,) = _run_tokens(dsn)
            assert cli("--dsn", dsn, "token", "revoke", str(revoked["id"])).returncode == 0
        elif step == 1:
            os.chmod(kept, 0o644)  # readable by others: no longer a secret
    assert len(set(tokens)) == 3
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert kept.read_text().strip() == tokens[-1]
    by_age = sorted(_run_tokens(dsn), key=lambda t: t["id"])
    assert [t["revoked_at"] is None for t in by_age] == [False, True, True]


def test_task_create_warns_when_no_live_executor_serves_the_app(dsn):
    body = json.dumps({"id": "b1", "app": "billing", "commands": [{"method": "x"}]})
    created = cli("--dsn", dsn, "task", "create", body)
    assert created.returncode == 0, created.stderr
    assert "no live executor serves app 'billing'" in created.stderr
    assert "kaiju-tasks executor --app billing" in created.stderr
    shown = cli("--dsn", dsn, "top", "--once")
    assert shown.returncode == 0, shown.stderr
    assert "no live executor serves app billing (1 queued)" in shown.stdout
    executor = Running("--dsn", dsn, "executor", "--app", "billing", "--id", "billing-ex")
    try:
        executor.wait_for("kaiju-tasks executor running")
        body = json.dumps({"id": "b2", "app": "billing", "commands": [{"method": "x"}]})
        again = cli("--dsn", dsn, "task", "create", body)
        assert again.returncode == 0, again.stderr
        assert "warning" not in again.stderr
        top = cli("--dsn", dsn, "top", "--once")
        assert "no live executor serves" not in top.stdout
    finally:
        executor.interrupt()
        executor.close()


def test_task_create_warns_when_no_live_debug_executor_serves_the_queue(dsn):
    queue = "orders@debug-0a1b2c3d"
    body = json.dumps({"id": "d1", "app": queue, "commands": [{"method": "x"}]})
    created = cli("--dsn", dsn, "task", "create", body)
    assert created.returncode == 0, created.stderr
    assert f"no live debug executor serves queue {queue!r}" in created.stderr
    assert "reason debug_executor_gone" in created.stderr
    assert "kaiju-tasks executor --debug" in created.stderr
    assert "no live executor serves app" not in created.stderr  # not the production advice


def test_executor_refuses_a_debug_queue_as_an_app(dsn):
    refused = cli("--dsn", dsn, "executor", "--app", "orders@debug-12345678")
    assert refused.returncode == 1
    assert "Traceback" not in refused.stderr
    assert "app 'orders@debug-12345678'" in refused.stderr
    assert "private queues of debug executors (start one with --debug instead)" in refused.stderr
    assert _query(dsn, "SELECT id FROM executors") == []  # nothing came online


def _executor_apps(dsn):
    rows = _query(dsn, "SELECT apps FROM executors WHERE stopped_at IS NULL")
    return [sorted(r["apps"]) for r in rows]


def _get(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def _orders_task_called_unreachable_url(url: str, token: str, task_id: str) -> dict[str, Any]:
    """Create an ``orders`` task over HTTP and wait until run's executor has called the app's
    URL (127.0.0.1:9, where nothing listens) and failed it; return the create request."""
    create: dict[str, Any] = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tasks.create",
        "params": {"data": {"id": task_id, "app": "orders", "commands": [{"method": "o.x"}]}},
    }
    assert post(url, create, token)["result"]["status"] == "QUEUED"
    get = {"jsonrpc": "2.0", "id": 2, "method": "tasks.get", "params": {"id": task_id}}
    deadline = time.monotonic() + 60
    while post(url, get, token)["result"]["status"] in ("QUEUED", "EXECUTED"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "127.0.0.1:9" in json.dumps(post(url, get, token)["result"]["error"])
    return create


def test_run_serves_the_apps_configured_with_a_url_unless_executor_apps_is_set(dsn, tmp_path):
    # Nothing listens on port 9: the stage fails to connect, which shows the task was taken.
    env = {
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "KAIJU_TASKS_APPS_ORDERS": "http://127.0.0.1:9/public/rpc",
    }
    run = Running("--dsn", dsn, "run", "--port", "0", env=env)
    try:
        url = run.wait_for("kaiju-tasks API on ")
        token = run.wait_for("system token: ")
        run.wait_for("kaiju-tasks running")
        assert _executor_apps(dsn) == [["default", "orders"]]
        create = _orders_task_called_unreachable_url(url, token, "o1")
        assert run.interrupt() == 0
    finally:
        run.close()
    env["KAIJU_TASKS_EXECUTOR_APPS"] = "default"  # given explicitly: exactly these
    run = Running("--dsn", dsn, "run", "--port", "0", env=env)
    try:
        url = run.wait_for("kaiju-tasks API on ")
        token = run.wait_for("system token: ")
        run.wait_for("kaiju-tasks running")
        assert _executor_apps(dsn) == [["default"]]
        create["params"]["data"]["id"] = "o2"
        assert post(url, create, token)["result"]["status"] == "QUEUED"
        health = json.loads(_get(url.replace("/public/rpc", "/health")))
        assert [u["app"] for u in health["unserved_apps"]] == ["orders"]
        metrics = _get(url.replace("/public/rpc", "/metrics"))
        assert 'kaiju_tasks_unserved_tasks{app="orders"} 1.0' in metrics
        assert run.interrupt() == 0
    finally:
        run.close()


def test_run_serves_the_apps_of_an_ini_files_apps_section(dsn, tmp_path):
    config = tmp_path / "kaiju-tasks.ini"
    config.write_text("[apps]\norders = http://127.0.0.1:9/public/rpc\n")  # nothing listens
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    run = Running("--dsn", dsn, "--config-path", str(config), "run", "--port", "0", env=state)
    try:
        url = run.wait_for("kaiju-tasks API on ")
        token = run.wait_for("system token: ")
        run.wait_for("kaiju-tasks running")
        assert _executor_apps(dsn) == [["default", "orders"]]
        _orders_task_called_unreachable_url(url, token, "o1")
        assert run.interrupt() == 0
    finally:
        run.close()


@pytest.fixture
def embedded_env():
    """Settings that make the CLI start its own embedded server in a fresh directory."""
    # Under /tmp, open to traverse: run as root, the server runs as another user.
    data_dir = tempfile.mkdtemp(prefix="kaiju-tasks-quiet-", dir="/tmp")
    os.chmod(data_dir, 0o755)
    yield {"KAIJU_TASKS_DATABASE_DSN": "", "KAIJU_TASKS_EMBEDDED_DIR": str(Path(data_dir) / "pg")}
    shutil.rmtree(data_dir, ignore_errors=True)


def test_short_commands_are_quiet_unless_asked(embedded_env, empty_dsn):
    env = embedded_env
    migrated = cli("migrate", env=env, timeout=120)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stderr == ""
    body = json.dumps({"id": "q1", "commands": [{"method": "x"}]})
    short = (
        ("task", "list"),
        ("token", "list"),
        ("notifications", "list"),
        ("config",),
        ("top", "--once"),
    )
    for args in short:
        quiet = cli(*args, env=env, timeout=120)
        assert quiet.returncode == 0, quiet.stderr
        assert quiet.stderr == "", args
    created = cli("task", "create", body, env=env, timeout=120)
    assert "INFO" not in created.stderr  # the warning about no executor stays
    assert "Embedded PostgreSQL" not in created.stderr
    shown = cli("events", "--from-start", "--limit", "1", "--timeout", "20", env=env)
    assert shown.stderr == ""
    loud = cli("--log-level", "INFO", "task", "list", env=env, timeout=120)
    assert loud.returncode == 0, loud.stderr
    assert "INFO kaiju_tasks.store.embedded: Embedded PostgreSQL" in loud.stderr
    # on a configured database too: migrate's INFO lines only with --log-level
    assert cli("--dsn", empty_dsn, "migrate").stderr == ""
    again = cli("--dsn", empty_dsn, "--log-level", "info", "task", "list")
    assert again.returncode == 0, again.stderr


def _readme_python() -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## In Python", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def _readme_output() -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## In Python", 1)[1].split("\n## ", 1)[0]
    (shown,) = re.findall(r"```text\n(.*?)```", section, re.S)
    return shown.strip()


def test_the_readme_python_example_runs_as_written_and_again(dsn, tmp_path):
    script = tmp_path / "orders.py"
    script.write_text(_readme_python())
    for _ in range(2):  # a second run creates another task, no Conflict
        ran = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp_path,
            env={**os.environ, "KAIJU_TASKS_DATABASE_DSN": dsn},
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == _readme_output()
    rows = _query(dsn, "SELECT status FROM tasks WHERE app_name = 'orders'")
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED"]


# Runs a script as written, with the default data directories moved under argv[1]: root's by
# the module setting the server reads, anyone else's by XDG_DATA_HOME (set by the caller).
AS_WRITTEN = """
import runpy, sys
from pathlib import Path
from kaiju_tasks.store.embedded import settings
settings.ROOT_STATE_DIR = Path(sys.argv[1])
runpy.run_path(sys.argv[2], run_name="__main__")
"""


def test_the_first_hour_with_no_configuration_runs_on_the_embedded_server(embedded_env, tmp_path):
    # No DSN anywhere: the README's script starts the embedded PostgreSQL in the default data
    # directory; `run` serves the same cluster; a second `run` on the busy port fails without
    # harming the first.
    base = Path(embedded_env["KAIJU_TASKS_EMBEDDED_DIR"]).parent  # fresh, traversable
    default_dir = base / "postgres" if os.geteuid() == 0 else base / "kaiju-tasks" / "postgres"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAIJU_TASKS_")}
    env["XDG_DATA_HOME"] = str(base)
    script = tmp_path / "orders.py"
    script.write_text(_readme_python())
    try:
        ran = subprocess.run(
            [sys.executable, "-c", AS_WRITTEN, str(base), str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp_path,
            env=env,
        )
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.strip() == _readme_output()
        assert (default_dir / "PG_VERSION").exists()  # the script's cluster
        # `kaiju-tasks` reads KAIJU_TASKS_EMBEDDED_DIR, not the module setting moved above
        cli_env = {**embedded_env, "KAIJU_TASKS_EMBEDDED_DIR": str(default_dir)}
        cli_env |= {"XDG_DATA_HOME": str(base), "XDG_STATE_HOME": str(tmp_path / "state")}
        first = Running("run", "--port", "0", env=cli_env)
        try:
            url = first.wait_for("kaiju-tasks API on ", within=120)
            token = first.wait_for("system token: ")
            first.wait_for("kaiju-tasks running")
            port = url.split("//")[1].split("/")[0].rsplit(":", 1)[1]
            second = cli("run", "--port", port, env=cli_env, timeout=120)
            assert second.returncode == 1
            assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
            assert "system token" not in second.stdout
            assert "Traceback" not in second.stderr
            # the first still answers its token, over the task the script left in the cluster
            params = {"conditions": {"app_name": "orders"}, "columns": ["status"]}
            listed = post(url, {**LIST, "params": params}, token)
            assert listed["result"]["data"] == [{"status": "FINISHED"}]
            assert first.interrupt() == 0
        finally:
            first.close()
    finally:
        _stop_server(default_dir)


def _stop_server(data_dir: Path) -> None:
    """Safety net: fast-shut down a server a failed test left running in ``data_dir``."""
    import signal

    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)


def test_the_guide_first_example_migrates_then_creates_a_task(empty_dsn, tmp_path):
    guide = (Path(__file__).resolve().parents[2] / "docs" / "guide.md").read_text()
    section = guide.split("\n## Setup", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    written = 'DSN = "postgresql://postgres@127.0.0.1:5432/postgres"'
    assert written in code
    script = tmp_path / "setup.py"
    script.write_text(code.replace(written, f"DSN = {empty_dsn!r}"))  # a database with no schema
    ran = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert ran.returncode == 0, ran.stderr
    task_id, status = ran.stdout.split()
    assert status == "QUEUED"
    assert [r["id"] for r in _query(empty_dsn, "SELECT id FROM tasks")] == [task_id]


def test_get_and_list_return_the_columns_rpc_md_lists(dsn):
    rpc = (Path(__file__).resolve().parents[2] / "docs" / "rpc.md").read_text()
    listed = rpc.split("The task columns are ", 1)[1].split(". They are explained", 1)[0]
    documented = re.findall(r"`(\w+)`", listed)
    body = json.dumps({"id": "cols", "commands": [{"method": "x"}]})
    assert cli("--dsn", dsn, "task", "create", body).returncode == 0
    got = json.loads(cli("--dsn", dsn, "task", "get", "cols", "--json").stdout)
    assert list(got) == documented
    # and over the API rpc.md describes: tasks.get and tasks.list without columns
    secret = cli("--dsn", dsn, "token", "create", "--user", "ops", "--system").stdout.strip()
    server = Running("--dsn", dsn, "server", "--port", "0")
    try:
        url = server.wait_for("kaiju-tasks API on ")
        get = {"jsonrpc": "2.0", "id": 1, "method": "tasks.get", "params": {"id": "cols"}}
        assert list(post(url, get, secret)["result"]) == documented
        listed = post(url, {**LIST, "params": {}}, secret)["result"]
        assert [list(row) for row in listed["data"]] == [documented]
    finally:
        server.interrupt()
        server.close()
    assert {"requeues", "claim_id"} <= set(documented)
