"""The ``kaiju-tasks`` command line as subprocesses: tokens, ``server``, ``run``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def cli(*args, env=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "kaiju_tasks.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
    )


def post(url, body, token=None):
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Bearer {token}"} if token else {}),
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _get(url, token):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


class Running:
    """A long-running CLI subprocess whose stdout lines are collected."""

    def __init__(self, *args, env=None):
        self.out = Path(tempfile.mkstemp(suffix=".out")[1])
        self.err = Path(tempfile.mkstemp(suffix=".err")[1])
        # `run` keeps its token under the state directory: a private one, unless given
        self.state = Path(tempfile.mkdtemp(prefix="kaiju-tasks-state-"))
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kaiju_tasks.cli", *args],
                stdout=out,
                stderr=err,
                env={
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "XDG_STATE_HOME": str(self.state),
                    **(env or {}),
                },
            )

    def wait_for(self, prefix, within=60):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for line in self.out.read_text().splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r}:\n{self.out.read_text()}\n{self.err.read_text()}")

    def interrupt(self):
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(30)

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.out.unlink(missing_ok=True)
        self.err.unlink(missing_ok=True)
        shutil.rmtree(self.state, ignore_errors=True)


def test_token_create_list_revoke(dsn):
    created = cli(
        "--dsn",
        dsn,
        "token",
        "create",
        "--user",
        "alice",
        "--permission",
        "view_others",
        "--name",
        "ci",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    token = json.loads(created.stdout)
    assert token["token"].startswith("kt_")
    assert token["permissions"] == ["view_others"]
    listed = cli("--dsn", dsn, "token", "list", "--json")
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["user_id"]) for r in rows] == [(token["id"], "alice")]
    assert "token" not in rows[0]
    assert "token_hash" not in rows[0]
    revoked = cli("--dsn", dsn, "token", "revoke", str(token["id"]))
    assert revoked.returncode == 0
    assert "revoked" in revoked.stdout
    again = cli("--dsn", dsn, "token", "revoke", str(token["id"]))
    assert again.returncode == 1
    assert "no active token" in again.stderr


def test_plain_token_create_prints_only_the_token(dsn):
    created = cli("--dsn", dsn, "token", "create", "--user", "u", "--system")
    assert created.returncode == 0
    assert created.stdout.strip().startswith("kt_")
    assert len(created.stdout.strip().splitlines()) == 1


def test_run_serves_requests_and_stops_on_sigint_without_losing_a_task(dsn, tmp_path):
    release = tmp_path / "release"
    run = Running(
        "--dsn", dsn, "run", "--port", "0", "--methods", "tests.acceptance.methods_for_cli:methods"
    )
    try:
        url = run.wait_for("kaiju-tasks API on ")
        token = run.wait_for("system token: ")
        run.wait_for("kaiju-tasks running")
        created = post(
            url,
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tasks.create",
                "params": {
                    "data": {
                        "id": "slow",
                        "commands": [{"method": "cli.hold", "params": {"path": str(release)}}],
                    }
                },
            },
            token,
        )
        assert created["result"]["status"] == "QUEUED"
        dashboard = run.wait_for("dashboard on ").split()[0]
        page = _get(dashboard + "tasks/slow", token)
        assert "cli.hold" in page  # the dashboard is served next to the API
        deadline = time.monotonic() + 60
        while (
            post(
                url,
                {
                    "jsonrpc": "2.0",
                    "id": 2,
                    "method": "tasks.get",
                    "params": {"id": "slow", "columns": ["status"]},
                },
                token,
            )["result"]["status"]
            != "EXECUTED"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The stage is running (it holds until released): SIGINT, then let it end within the
        # grace period.
        run.process.send_signal(signal.SIGINT)
        release.touch()
        assert run.process.wait(30) == 0
    finally:
        run.close()
    got = cli("--dsn", dsn, "token", "create", "--user", "x", "--system")
    assert got.returncode == 0
    import asyncio

    import asyncpg

    async def status():
        connection = await asyncpg.connect(dsn)
        try:
            return await connection.fetchrow("SELECT status, result FROM tasks WHERE id='slow'")
        finally:
            await connection.close()

    row = asyncio.run(status())
    assert row["status"] == "FINISHED"
    assert json.loads(row["result"]) == ["released"]


def test_run_on_the_embedded_database_with_the_demo():
    data_dir = tempfile.mkdtemp(prefix="kaiju-tasks-embedded-", dir="/tmp")
    os.chmod(data_dir, 0o755)
    env = {
        "KAIJU_TASKS_DATABASE_DSN": "",
        "KAIJU_TASKS_TEST_DSN": "",
        "KAIJU_TASKS_EMBEDDED_DIR": str(Path(data_dir) / "pg"),
    }
    run = Running("run", "--demo", "--port", "0", env=env)
    try:
        url = run.wait_for("kaiju-tasks API on ", within=90)
        token = run.wait_for("system token: ")
        task_id = run.wait_for("demo task ").split()[0]
        deadline = time.monotonic() + 30
        while True:
            task = post(
                url,
                {"jsonrpc": "2.0", "id": 1, "method": "tasks.get", "params": {"id": task_id}},
                token,
            )["result"]
            if task["status"] == "FINISHED":
                break
            assert time.monotonic() < deadline, task
            time.sleep(0.2)
        assert task["result"][-1] == "deleted 2 expired orders: A-1, A-3"
        assert run.interrupt() == 0
    finally:
        run.close()
        subprocess.run(["rm", "-rf", data_dir], check=False)


def test_task_commands_create_get_list_cancel_message(dsn):
    created = cli(
        "--dsn",
        dsn,
        "task",
        "create",
        '{"id": "c1", "commands": [{"method": "x"}], "app": "orders"}',
        "--json",
    )
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["status"] == "QUEUED"
    got = cli("--dsn", dsn, "task", "get", "c1", "--columns", "status,app_name", "--json")
    assert json.loads(got.stdout) == {"status": "QUEUED", "app_name": "orders"}
    listed = cli("--dsn", dsn, "task", "list", "--app", "orders")
    assert listed.stdout.splitlines()[0].split()[:3] == ["ID", "APP_NAME", "STATUS"]
    assert "c1" in listed.stdout
    assert "1 of 1" in listed.stdout
    refused = cli("--dsn", dsn, "task", "message", "c1", '{"a": 1}')
    assert refused.returncode == 1
    assert "not waiting for a message" in refused.stderr
    cancelled = cli("--dsn", dsn, "task", "cancel", "c1", "--json")
    assert json.loads(cancelled.stdout)["exit_code"] == 130
    bad = cli("--dsn", dsn, "task", "create", '{"commands": []}')
    assert bad.returncode == 1
    assert "commands" in bad.stderr
    assert "Traceback" not in bad.stderr
    notes = cli("--dsn", dsn, "notifications", "list", "--json")
    assert json.loads(notes.stdout)["count"] == 0


def test_config_shows_values_sources_and_masks_secrets(tmp_path):
    ini = tmp_path / "k.ini"
    ini.write_text("[server]\nport = 9999\n")
    shown = cli(
        "--config-path",
        str(ini),
        "--log-level",
        "DEBUG",
        "config",
        "--json",
        env={"KAIJU_TASKS_DATABASE_DSN": "postgresql://u:hunter2@db/x"},
    )
    assert shown.returncode == 0, shown.stderr
    values = json.loads(shown.stdout)
    assert values["server.port"] == {"value": 9999, "source": str(ini)}
    assert values["database.dsn"] == {
        "value": "postgresql://u:***@db/x",
        "source": "env KAIJU_TASKS_DATABASE_DSN",
    }
    assert values["logging.level"] == {"value": "DEBUG", "source": "command line"}
    assert values["server.host"]["source"] == "default"
    assert "hunter2" not in shown.stdout


def test_events_prints_one_line_per_event(dsn):
    assert (
        cli(
            "--dsn",
            dsn,
            "task",
            "create",
            '{"id": "e1", "commands": [{"method": "x"}], "app": "orders"}',
        ).returncode
        == 0
    )
    shown = cli("--dsn", dsn, "events", "--from-start", "--limit", "1", "--timeout", "20")
    assert shown.returncode == 0, shown.stderr
    line = shown.stdout.strip()
    assert line.startswith("[")
    assert line.endswith("] TASK-SENT orders (STATUS=QUEUED, ID=e1, STAGE=0/1)")  # from 0


def test_commands_refuse_a_database_that_needs_migrations(empty_dsn):
    result = cli("--dsn", empty_dsn, "task", "list")
    assert result.returncode == 1
    assert "run `kaiju-tasks migrate` first" in result.stderr
    assert "Traceback" not in result.stderr


def test_events_limit_counts_only_the_printed_lines(dsn):
    for task_id in ("a1", "b1"):
        body = json.dumps({"id": task_id, "commands": [{"method": "x"}]})
        assert cli("--dsn", dsn, "task", "create", body).returncode == 0
    shown = cli(
        "--dsn", dsn, "events", "--from-start", "--task", "b1", "--limit", "1", "--timeout", "20"
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip().endswith("ID=b1, STAGE=0/1)")


def test_top_shows_executors_and_running_tasks(dsn, tmp_path):
    release = tmp_path / "release"
    executor = Running(
        "--dsn",
        dsn,
        "executor",
        "--id",
        "top-ex",
        "--methods",
        "tests.acceptance.methods_for_cli:methods",
        "--heartbeat",
        "0.2",
    )
    try:
        executor.wait_for("kaiju-tasks executor running")
        body = json.dumps(
            {
                "id": "slow-top",
                "commands": [{"method": "cli.hold", "params": {"path": str(release)}}],
            }
        )
        assert cli("--dsn", dsn, "task", "create", body).returncode == 0
        # The stage runs until the test releases it: top sees it running however slow the
        # machine is.
        deadline = time.monotonic() + 60
        while True:
            got = cli("--dsn", dsn, "task", "get", "slow-top", "--columns", "status", "--json")
            if json.loads(got.stdout)["status"] == "EXECUTED":
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        shown = cli("--dsn", dsn, "top", "--once")
        assert shown.returncode == 0, shown.stderr
        assert "top-ex" in shown.stdout
        assert "slow-top" in shown.stdout
        assert "EXECUTED" in shown.stdout
        assert "0/1" in shown.stdout  # stage 0 of 1, counted from 0 as in the API
        assert "online" in shown.stdout
    finally:
        release.touch()
        executor.interrupt()
        executor.close()


def _status(url, body, token):
    try:
        post(url, body, token)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Retry-After")
    return 200, None


def test_run_closes_slow_connections_limits_failed_logins_and_guards_app_methods(dsn):
    import socket

    plain = cli("--dsn", dsn, "token", "create", "--user", "reader").stdout.strip()
    run = Running(
        "--dsn",
        dsn,
        "run",
        "--port",
        "0",
        "--methods",
        "tests.acceptance.methods_for_cli:methods",
        env={
            "KAIJU_TASKS_SERVER_HEADER_TIMEOUT": "1",
            "KAIJU_TASKS_SERVER_AUTH_FAILURES": "3",
            "KAIJU_TASKS_SERVER_AUTH_WINDOW": "3600",
        },
    )
    try:
        url = run.wait_for("kaiju-tasks API on ")
        token = run.wait_for("system token: ")
        run.wait_for("kaiju-tasks running")
        # an application method loaded with --methods is not open to a plain token
        call = {"jsonrpc": "2.0", "id": 1, "method": "cli.slow", "params": {"seconds": 0}}
        assert post(url, call, plain)["error"]["code"] == -32001
        assert post(url, call, token)["result"] == "slept"
        # a connection trickling its request head is closed by the server
        host, port = url.split("//")[1].split("/")[0].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as slow:
            slow.sendall(b"POST /public/rpc HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            received = b"-"
            while received:  # one byte a second until the server closes (recv gives b"")
                try:
                    slow.sendall(b"a")
                    received = slow.recv(1024) if _readable(slow, 1.0) else b"-"
                except ConnectionError:
                    break
                assert time.monotonic() - started < 30
        # three wrong tokens, then 429 for everyone at this address, counted on /metrics
        wrong = {"jsonrpc": "2.0", "id": 1, "method": "tasks.list"}
        for _ in range(3):
            assert post(url, wrong, "kt_wrong")["error"]["code"] == -32001
        status, retry_after = _status(url, wrong, token)
        assert status == 429
        assert int(retry_after) >= 1
        metrics = _get(url.replace("/public/rpc", "/metrics"), token)
        assert 'kaiju_tasks_auth_refused_total{reason="invalid"} 3.0' in metrics
        assert 'kaiju_tasks_auth_refused_total{reason="rate_limited"} 1.0' in metrics
    finally:
        run.interrupt()
        run.close()


def _readable(sock, within):
    import select

    return bool(select.select([sock], [], [], within)[0])


def test_a_debug_executor_serves_its_private_queue_and_fails_it_on_stop(dsn, tmp_path):
    release = tmp_path / "release"
    debug = Running(
        "--dsn",
        dsn,
        "executor",
        "--debug",
        "--methods",
        "tests.acceptance.methods_for_cli:methods",
        "--heartbeat",
        "0.2",
    )
    try:
        debug.wait_for("kaiju-tasks executor running")
        queue = debug.wait_for("debug queue for default:")
        assert queue.startswith("default@debug-")
        body = {"id": "for-debug", "commands": [{"method": "cli.slow", "params": {"seconds": 0}}]}
        assert cli("--dsn", dsn, "task", "create", json.dumps(body)).returncode == 0
        copied = cli("--dsn", dsn, "task", "copy", "for-debug", "--app", queue, "--json")
        assert copied.returncode == 0, copied.stderr
        copy_id = json.loads(copied.stdout)["id"]
        deadline = time.monotonic() + 60
        while True:  # the copy runs on the debug executor; the original waits for production
            got = cli("--dsn", dsn, "task", "get", copy_id, "--columns", "status,result", "--json")
            if json.loads(got.stdout)["status"] == "FINISHED":
                break
            assert time.monotonic() < deadline, got.stdout
            time.sleep(0.1)
        assert json.loads(got.stdout)["result"] == ["slept"]
        original = cli("--dsn", dsn, "task", "get", "for-debug", "--columns", "status", "--json")
        assert json.loads(original.stdout)["status"] == "QUEUED"
        shown = cli("--dsn", dsn, "top", "--once")
        assert "online (debug)" in shown.stdout
        held = {"id": "held", "app": queue, "commands": [{"method": "_MESSAGE_"}]}
        assert cli("--dsn", dsn, "task", "create", json.dumps(held)).returncode == 0
    finally:
        release.touch()
        assert debug.interrupt() == 0
        debug.close()
    left = cli("--dsn", dsn, "task", "get", "held", "--columns", "status,error", "--json")
    row = json.loads(left.stdout)
    assert row["status"] == "FAILED"
    assert row["error"]["reason"] == "debug_executor_gone"


def test_server_executor_and_manager_work_through_pgbouncer(dsn):
    from tests import pgbouncer

    with pgbouncer.pgbouncer(dsn) as pooled:
        env = {"KAIJU_TASKS_DATABASE_DSN": pooled, "KAIJU_TASKS_DATABASE_DIRECT_DSN": dsn}
        token = cli("token", "create", "--user", "ops", "--system", env=env)
        assert token.returncode == 0, token.stderr
        secret = token.stdout.strip()
        methods = ("--methods", "tests.acceptance.methods_for_cli:methods")
        procs = [
            Running("server", "--port", "0", env=env),
            Running("executor", *methods, "--heartbeat", "0.2", env=env),
            Running("manager", "--interval", "0.2", env=env),
        ]
        try:
            url = procs[0].wait_for("kaiju-tasks API on ")
            for proc in procs[1:]:
                proc.wait_for("kaiju-tasks ")
            body = {
                "id": "pooled",
                "commands": [
                    {"method": "cli.slow", "params": {"seconds": 0}},
                    {"method": "_MESSAGE_"},
                    {"method": "cli.slow", "params": {"seconds": 0}},
                ],
            }
            created = post(
                url,
                {"jsonrpc": "2.0", "id": 1, "method": "tasks.create", "params": {"data": body}},
                secret,
            )
            assert created["result"]["status"] == "QUEUED", created

            def status():
                got = post(
                    url,
                    {"jsonrpc": "2.0", "id": 2, "method": "tasks.get", "params": {"id": "pooled"}},
                    secret,
                )
                return got["result"]["status"]

            deadline = time.monotonic() + 60
            while status() != "WAITING":  # parked on the Message by the executor
                assert time.monotonic() < deadline
                time.sleep(0.05)
            sent = post(
                url,
                {
                    "jsonrpc": "2.0",
                    "id": 3,
                    "method": "tasks.write_message",
                    "params": {"id": "pooled", "data": {"ok": True}},
                },
                secret,
            )
            assert "error" not in sent, sent
            while status() != "FINISHED":  # queued again by the message, run to the end
                assert time.monotonic() < deadline
                time.sleep(0.05)
            health = json.loads(_get(url.rsplit("/", 2)[0] + "/health", secret))
            assert health["leader"] is True
            assert health["executors"] >= 1
        finally:
            for proc in procs:
                proc.interrupt()
                proc.close()
