"""No secret of an app URL or a DSN reaches a task error, a log line, ``config``, /health, /metrics.

The URLs carry a password and a query secret (``http://svc:pw-SECRET@host/rpc?api_key=K-SECRET``);
the apps are down (a bound socket that refuses connections), answer a page that is not JSON, or
answer HTTP 500 with an HTML page. The checks read what a person would read: the task over the
HTTP API, the stderr of ``kaiju-tasks run`` at DEBUG, ``kaiju-tasks config`` and ``events``, and
the two unauthenticated pages.

Also here: a remote stage's reply is read no further than ``stage_result_bytes`` (plus the
envelope), with or without a Content-Length, compressed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from aiohttp import web

from kaiju_tasks import errors, limits
from kaiju_tasks.rpc import client as rpc_client
from kaiju_tasks.testing import eventually

pytestmark = pytest.mark.timeout(180)

PASSWORD = "pw-SECRET"
KEY = "K-SECRET"
SECRETS = (PASSWORD, KEY)
NOT_JSON = "<html><body>maintenance</body></html>"


def _assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} shown in {where}:\n{text[:4000]}"


def _secret_url(host: str, port: int | str, path: str) -> str:
    return f"http://svc:{PASSWORD}@{host}:{port}{path}?api_key={KEY}"


def _secret_dsn(dsn: str) -> str:
    """``dsn`` with a password in its userinfo and again as ``?password=`` (trust auth)."""
    parts = urlsplit(dsn)
    user = parts.username or "postgres"
    host = parts.netloc.rpartition("@")[2]
    query = "&".join(q for q in (parts.query, f"password={PASSWORD}") if q)
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{host}", query=query))


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound on loopback without listening: connections to it are refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
async def bad_app(aiohttp_server: Any) -> Any:
    """An app that answers a page that is not JSON, or HTTP 500 with an HTML page."""

    async def html(_request: web.Request) -> web.Response:
        return web.Response(text=NOT_JSON, content_type="text/html")

    async def error500(_request: web.Request) -> web.Response:
        return web.Response(status=500, text=NOT_JSON, content_type="text/html")

    app = web.Application()
    app.router.add_post("/html", html)
    app.router.add_post("/error500", error500)
    return await aiohttp_server(app)


@pytest.fixture
def app_urls(bad_app: Any, closed_port: int) -> dict[str, str]:
    return {
        "down": _secret_url("127.0.0.1", closed_port, "/rpc"),
        "html": _secret_url(bad_app.host, bad_app.port, "/html"),
        "error500": _secret_url(bad_app.host, bad_app.port, "/error500"),
    }


async def _call(client: rpc_client.Client, url: str) -> Any:
    return await client.call(
        url, "app.m", {}, request_id="1", correlation_id=None, deadline=None, seconds_left=5.0
    )


# -- the client's errors ------------------------------------------------------------------------


@pytest.mark.parametrize("app", ["down", "html", "error500", "not a port", "token and password"])
async def test_a_failed_stage_call_names_the_url_without_its_secrets(app_urls, app):
    client = rpc_client.Client()
    url = app_urls.get(app, app_urls["down"])
    if app == "not a port":
        url = _secret_url("127.0.0.1", "notaport", "/rpc")
    if app == "token and password":  # aiohttp refuses both: a ValueError, not a ClientError
        client.token = "kt_token"
    try:
        with pytest.raises(errors.TransportError) as raised:
            await _call(client, url)
    finally:
        await client.close()
    message = raised.value.message or ""
    _assert_no_secret(message, "the error")
    _assert_no_secret("".join(traceback.format_exception(raised.value)), "the traceback")
    assert "svc:***@" in message
    assert "api_key=***" in message
    if app in ("html", "error500"):
        assert f"HTTP {200 if app == 'html' else 500} with a body that is not JSON" in message


# -- a real `kaiju-tasks run` ---------------------------------------------------------------------


class Cli:
    """A ``kaiju-tasks`` subprocess; its stdout and stderr go to files read while it runs."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.out = tmp / "run.out"
        self.err = tmp / "run.err"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kaiju_tasks.cli", *args],
                stdout=out,
                stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def line(self, prefix: str) -> str:
        def found() -> str | None:
            for line in self.out.read_text().splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            assert self.process.poll() is None, self.err.read_text()
            return None

        value: str = await eventually(found, within=90, what=f"a line {prefix!r}")
        return value

    async def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                await eventually(lambda: self.process.poll() is not None, within=30)
        if self.process.poll() is None:
            self.process.kill()
        await asyncio.to_thread(self.process.wait)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kaiju_tasks.cli", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _ini(tmp: Path, app_urls: dict[str, str], dsn: str | None = None) -> Path:
    ini = tmp / "kaiju-tasks.ini"
    lines = ["[executor]", f"apps = {','.join(app_urls)}", "[apps]"]
    lines += [f"{name} = {url}" for name, url in app_urls.items()]
    if dsn is not None:
        lines += ["[database]", f"dsn = {dsn}"]
    ini.write_text("\n".join(lines) + "\n")
    return ini


@pytest.fixture(params=["text", "json"])
async def running(
    request: pytest.FixtureRequest, tmp_path: Path, dsn: str, app_urls: dict[str, str]
) -> AsyncIterator[tuple[Cli, str, str]]:
    ini = _ini(tmp_path, app_urls, _secret_dsn(dsn))
    options = ["--log-level", "DEBUG", "--log-format", request.param]
    run = Cli(tmp_path, "--config-path", str(ini), *options, "run", "--port", "0")
    try:
        url = await run.line("kaiju-tasks API on ")
        token = await run.line("system token: ")
        await run.line("kaiju-tasks running")
        yield run, url, token
    finally:
        await run.stop()


async def test_run_shows_no_url_or_dsn_secret_in_errors_logs_health_or_metrics(
    running, app_urls, dsn
):
    run, url, token = running
    headers = {"Authorization": f"Bearer {token}"}
    base = url.rsplit("/public/rpc", 1)[0]
    async with aiohttp.ClientSession(headers=headers) as http:

        async def rpc(method: str, params: Any) -> Any:
            body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
            async with http.post(url, json=body) as response:
                reply = await response.json()
            assert "result" in reply, reply
            return reply["result"]

        for app in app_urls:
            await rpc(
                "tasks.create", {"data": {"id": app, "app": app, "commands": [{"method": "m"}]}}
            )

        async def failed(app: str) -> Any:
            task = await rpc("tasks.get", {"id": app})
            return task if task.get("error") else None

        for app in app_urls:
            task = await eventually(functools.partial(failed, app), within=60, what=app)
            shown = json.dumps(task)
            _assert_no_secret(shown, f"task {app}")
            assert "svc:***@" in task["error"]["message"], task["error"]
        async with http.get(f"{base}/health") as response:
            health = await response.text()
        async with http.get(f"{base}/metrics") as response:
            metrics = await response.text()
        listed = await rpc("tasks.list", {"columns": ["id", "error"]})
    _assert_no_secret(health, "/health")
    _assert_no_secret(metrics, "/metrics")
    assert "kaiju_tasks_tasks" in metrics
    _assert_no_secret(json.dumps(listed), "tasks.list")
    events = await asyncio.to_thread(
        cli, "--dsn", dsn, "events", "--from-start", "--verbose", "--timeout", "3"
    )
    assert "svc:***@" in events.stdout, events.stdout + events.stderr
    _assert_no_secret(events.stdout + events.stderr, "kaiju-tasks events")
    await run.stop()
    log = run.err.read_text()
    assert "DEBUG" in log  # the log was written at DEBUG
    assert "svc:***@" in log  # the failures were logged, with the URL redacted
    _assert_no_secret(log, "the log of kaiju-tasks run")
    _assert_no_secret(run.out.read_text(), "the output of kaiju-tasks run")
    if log.startswith("{"):  # the json format: masking kept every line a JSON object
        assert all(json.loads(line) for line in log.splitlines())


# -- configuration and a database that cannot be reached -------------------------------------------


@pytest.mark.parametrize("as_json", [False, True])
def test_config_masks_url_passwords_and_every_query_value(tmp_path, closed_port, as_json):
    app_urls = {
        "down": _secret_url("127.0.0.1", closed_port, "/rpc"),
        "query": f"http://127.0.0.1:{closed_port}/rpc?password={PASSWORD}&api_key={KEY}",
    }
    dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{closed_port}/x?password={PASSWORD}"
    ini = _ini(tmp_path, app_urls, dsn)
    shown = cli("--config-path", str(ini), "config", *(["--json"] if as_json else []))
    assert shown.returncode == 0, shown.stderr
    _assert_no_secret(shown.stdout + shown.stderr, "kaiju-tasks config")
    assert f"postgresql://postgres:***@127.0.0.1:{closed_port}/x?password=***" in shown.stdout
    assert f"http://svc:***@127.0.0.1:{closed_port}/rpc?api_key=***" in shown.stdout
    assert f"http://127.0.0.1:{closed_port}/rpc?password=***&api_key=***" in shown.stdout


@pytest.mark.parametrize("command", [["task", "list"], ["migrate"], ["run", "--port", "0"]])
def test_a_database_that_cannot_be_reached_is_reported_without_its_password(closed_port, command):
    dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{closed_port}/x?password={PASSWORD}"
    failed = cli("--dsn", dsn, "--log-level", "DEBUG", *command)
    assert failed.returncode != 0
    assert "cannot connect to the database" in failed.stderr, failed.stderr
    _assert_no_secret(failed.stdout + failed.stderr, f"kaiju-tasks {' '.join(command)}")


def test_a_database_that_refuses_the_login_is_reported_without_its_password(server_dsn):
    parts = urlsplit(server_dsn)
    host = parts.netloc.rpartition("@")[2]
    dsn = urlunsplit(
        parts._replace(netloc=f"no_such_role:{PASSWORD}@{host}", query=f"password={PASSWORD}")
    )
    failed = cli("--dsn", dsn, "--log-level", "DEBUG", "task", "list")
    assert failed.returncode != 0
    assert "cannot connect to the database" in failed.stderr, failed.stderr
    _assert_no_secret(failed.stdout + failed.stderr, "kaiju-tasks task list")


@pytest.mark.parametrize("password", [f"pa?{PASSWORD}", f"{PASSWORD}/x", f"{PASSWORD}#x"])
def test_a_dsn_that_cannot_be_parsed_is_reported_without_its_password(closed_port, password):
    """A password written without percent-encoding its '?', '/' or '#'."""
    dsn = f"postgresql://postgres:{password}@127.0.0.1:{closed_port}/x"
    failed = cli("--dsn", dsn, "task", "list")
    assert failed.returncode != 0
    _assert_no_secret(failed.stdout + failed.stderr, "kaiju-tasks task list")
    assert "Traceback" not in failed.stderr


# -- a remote stage's reply is read no further than the limit --------------------------------------

RESULT_BYTES = 5 * limits.MIB


@pytest.fixture
def stage_results_of_1_mib() -> Iterator[None]:
    before = limits.active()
    limits.configure(dataclasses.replace(before, stage_result_bytes=limits.MIB))
    try:
        yield
    finally:
        limits.configure(before)


def _reply(size: int) -> bytes:
    text = "a" * (size - 40)
    return json.dumps({"jsonrpc": "2.0", "id": "1", "result": text}).encode()


@pytest.fixture
async def big_app(aiohttp_server: Any) -> Any:
    """Answers a 5 MB result in each way a body can come."""
    big = _reply(RESULT_BYTES)

    async def sized(_request: web.Request) -> web.Response:
        return web.Response(body=big, content_type="application/json")

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for start in range(0, len(big), 64 * 1024):
                await response.write(big[start : start + 64 * 1024])
            await response.write_eof()
        return response

    async def lying(request: web.Request) -> web.StreamResponse:
        """Says 100 bytes, then sends 5 MB (the reader stops at the length it was told)."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 100
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            await response.write(big[:100])
        return response

    async def gzipped(_request: web.Request) -> web.Response:
        packed = gzip.compress(big)  # about 5 KB on the wire
        return web.Response(
            body=packed,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    async def fits(_request: web.Request) -> web.Response:
        return web.Response(body=_reply(limits.MIB), content_type="application/json")

    app = web.Application()
    for path, handler in [
        ("/sized", sized),
        ("/chunked", chunked),
        ("/lying", lying),
        ("/gzipped", gzipped),
        ("/fits", fits),
    ]:
        app.router.add_post(path, handler)
    return await aiohttp_server(app)


@pytest.mark.parametrize("path", ["/sized", "/chunked", "/gzipped"])
async def test_a_reply_over_stage_result_bytes_fails_the_stage_naming_the_limit(
    big_app, stage_results_of_1_mib, path
):
    client = rpc_client.Client()
    try:
        with pytest.raises(errors.StageError) as raised:
            await _call(client, _secret_url(big_app.host, big_app.port, path))
    finally:
        await client.close()
    assert type(raised.value) is errors.StageError
    assert raised.value.retryable is False
    assert "larger than stage_result_bytes (1 MiB)" in (raised.value.message or "")
    _assert_no_secret(raised.value.message or "", "the error")


async def test_a_reply_within_the_limit_and_its_envelope_is_read_whole(
    big_app, stage_results_of_1_mib
):
    client = rpc_client.Client()
    try:
        result = await _call(client, f"http://{big_app.host}:{big_app.port}/fits")
    finally:
        await client.close()
    assert len(result) == limits.MIB - 40


async def test_a_body_longer_than_its_content_length_is_not_read_past_it(
    big_app, stage_results_of_1_mib
):
    client = rpc_client.Client()
    try:
        with pytest.raises(errors.TransportError, match="not JSON"):
            await _call(client, f"http://{big_app.host}:{big_app.port}/lying")
    finally:
        await client.close()
