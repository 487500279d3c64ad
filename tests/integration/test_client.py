"""kaiju_tasks.client against a real server on loopback, over real HTTP, with real PostgreSQL.

The server is the one ``kaiju-tasks server`` runs (``rpc.server.runner``) over the services of a
TaskRuntime, whose executor and manager run the user guide's pipelines with in-process methods.
Its port is reserved before it listens, so a test can call it while it is down (connections are
refused) and then bring it up at the same address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kaiju_tasks import (
    Caller,
    Condition,
    Conflict,
    InvalidTransition,
    KaijuTasksError,
    Message,
    NotAuthorized,
    NotificationNotFound,
    RateLimited,
    RemoteError,
    SyncTasksClient,
    SystemClock,
    Task,
    TaskCommand,
    TaskNotFound,
    TaskRuntime,
    TasksClient,
    TaskUpdate,
    Timer,
    Unreachable,
    ValidationError,
    demo,
    errors,
    models,
    testing,
)
from kaiju_tasks import client as client_
from kaiju_tasks.methods import MethodError, Methods
from kaiju_tasks.models import NotificationUpdate
from kaiju_tasks.rpc import server as rpc_server
from kaiju_tasks.service import TokenService
from kaiju_tasks.store import postgres

pytestmark = pytest.mark.timeout(120)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "client.md"
WITHIN = 30.0  # seconds a test waits for the executor: far above what the pipelines take
ALICE = Caller.user("alice")


# -- the application and the server ------------------------------------------------------------


def guide_methods() -> Methods:
    """The user guide's application methods, served in-process by the runtime's executor."""
    methods = Methods()
    demo.register(methods)  # for the example of docs/client.md
    register = methods.register
    register("items.m_get")(lambda conditions: {"data": [{"id": "001"}, {"id": "005"}]})
    register("items.m_delete")(lambda id: {"deleted": id})
    register("settings.get")(lambda: {"cache": {"update_threshold": 42}})
    register("products.update_attributes")(lambda: {"count": 1000})
    register("products_cache.refresh")(lambda: "refreshed")
    register("statistics.request_report")(lambda callback_id: {"requested_for": callback_id})
    register("files.download")(lambda url: {"downloaded": url})
    register("do.something")(lambda: 1)
    register("do.something.else")(lambda: 2)
    register("orders.delete")(lambda conditions: {"deleted": 3})
    register("cache.clear")(lambda: True)
    register("cache.update")(lambda: {"updated": True})
    busy = [2]  # server.sync fails this many times, then answers

    @register("server.sync")
    def sync() -> str:
        if busy[0] > 0:
            busy[0] -= 1
            raise MethodError("server busy")
        return "synced"

    return methods


@pytest.fixture
async def runtime(dsn: str) -> AsyncIterator[TaskRuntime]:
    """Services, an executor for the apps ``orders`` and ``demo``, and a manager.

    Tasks of other apps (``default``, ``reports``) are never claimed: they stay as created.
    """
    async with TaskRuntime(
        dsn,
        apps=["orders", "demo"],
        methods=guide_methods(),
        manager_options={"interval": timedelta(milliseconds=100)},
        executor_options={"poll_interval": timedelta(milliseconds=100)},
    ) as rt:
        yield rt


def _store(runtime: TaskRuntime) -> postgres.PostgresEngineStore:
    assert runtime.store is not None
    return runtime.store


class Server:
    """The HTTP API on a loopback port reserved at once and listened on from :meth:`start`.

    Until then the port is bound but not listening, so connections to it are refused: the
    server is down, at the address it will have.
    """

    def __init__(self, api: rpc_server.Api) -> None:
        self.api = api
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.runner = rpc_server.runner(rpc_server.create_app(self.api))
        await self.runner.setup()
        await web.SockSite(self.runner, self.sock).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        self.sock.close()


@pytest.fixture
async def servers(runtime: TaskRuntime) -> AsyncIterator[Any]:
    """Make (not start) servers over the runtime's services; ``Api`` options pass through.

    Each is stopped at the end, whether it was started or not.
    """
    made: list[Server] = []

    async def health() -> dict[str, Any]:
        return {"database": True}

    def make(**options: Any) -> Server:
        api = rpc_server.Api(
            tasks=runtime.tasks,
            notifications=runtime.notifications,
            tokens=TokenService(_store(runtime)),
            methods=Methods(),
            health=health,
            **options,
        )
        made.append(Server(api))
        return made[-1]

    yield make
    for server in made:
        await server.stop()


@pytest.fixture
async def server(servers) -> Server:
    started = servers()
    await started.start()
    return started


@pytest.fixture
async def tokens(runtime: TaskRuntime) -> dict[str, str]:
    service = TokenService(_store(runtime))
    return {
        "system": (await service.create("root", ["system"]))["token"],
        "alice": (await service.create("alice"))["token"],
        "bob": (await service.create("bob"))["token"],
        "viewer": (await service.create("viewer", ["view_others"]))["token"],
    }


@pytest.fixture
async def client(server: Server, tokens: dict[str, str]) -> AsyncIterator[TasksClient]:
    async with TasksClient(server.url, tokens["alice"]) as opened:
        yield opened


class AsCaller:
    """The Python services as ``caller`` sees them: ``.tasks`` and ``.notifications``."""

    class _Bound:
        def __init__(self, service: Any, caller: Caller) -> None:
            self.service = service
            self.caller = caller

        def __getattr__(self, name: str) -> Any:
            return partial(getattr(self.service, name), caller=self.caller)

    def __init__(self, runtime: TaskRuntime, caller: Caller) -> None:
        self.tasks = self._Bound(runtime.tasks, caller)
        self.notifications = self._Bound(runtime.notifications, caller)


async def ended(client: TasksClient, task_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        task = await client.tasks.get(task_id)
        return task if task["status"] in ("FINISHED", "FAILED") else None

    return await testing.eventually(check, within=WITHIN, what=f"task {task_id} to end")


async def waiting_at(client: TasksClient, task_id: str, stage: int) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        task = await client.tasks.get(task_id)
        return task if (task["status"], task["stage"]) == ("WAITING", stage) else None

    return await testing.eventually(check, within=WITHIN, what=f"task {task_id} to wait")


# -- every method --------------------------------------------------------------------------------


async def test_every_task_method_round_trips(client: TasksClient, runtime: TaskRuntime):
    created = await client.tasks.create({"id": "t1", "commands": [{"method": "do.something"}]})
    assert (created["id"], created["status"], created["user_id"]) == ("t1", "QUEUED", "alice")
    assert set(created) == set(models.TASK_COLUMNS)

    many = await client.tasks.create(
        [
            Task(commands=[TaskCommand(method="x")]),
            {"app": "reports", "commands": [{"method": "y"}]},
        ],
        columns=["app_name", "commands"],
    )
    assert many == [
        {"app_name": "default", "commands": [_call("x")]},
        {"app_name": "reports", "commands": [_call("y")]},
    ]

    assert await client.tasks.get("t1", ["status"]) == {"status": "QUEUED"}
    assert await client.tasks.get("t1", columns="stages") == {"stages": 1}
    assert await client.tasks.exists("t1") is True
    assert await client.tasks.exists("nope") is False

    page = await client.tasks.list(
        conditions={"app_name": ["default", "reports"]},
        sort=[{"desc": "app_name"}],
        columns=["app_name"],
        limit=1,
    )
    assert (page["count"], page["pages"], page["on_page"]) == (3, 3, 1)
    assert page["data"] == [{"app_name": "reports"}]
    page = await client.tasks.list(conditions=[{"id": "t1"}, {"app_name": "reports"}], count=False)
    assert (page["count"], page["on_page"]) == (None, 2)
    page = await client.tasks.list(offset=2, limit=2, columns=["id"])
    assert (page["page"], page["on_page"]) == (2, 1)

    updated = await client.tasks.update("t1", {"description": "hi"})
    assert updated["description"] == "hi"
    updated = await client.tasks.update(
        "t1", TaskUpdate(priority="HIGH"), columns=["priority", "description"]
    )
    assert updated == {"priority": 10, "description": "hi"}

    cancelled = await client.tasks.cancel("t1")
    assert (cancelled["status"], cancelled["exit_code"]) == ("FAILED", 130)
    assert cancelled["error"]["code"] == -32006
    reset = await client.tasks.reset("t1")
    assert (reset["status"], reset["exit_code"], reset["error"]) == ("QUEUED", None, None)
    assert reset["job_id"] != cancelled["job_id"]

    copied = await client.tasks.copy("t1", "reports")
    assert (copied["app_name"], copied["meta"], copied["user_id"]) == (
        "reports",
        {"copy_of": "t1"},
        "alice",
    )
    assert (await client.tasks.copy("t1", app="maintenance", columns=["app_name"])) == {
        "app_name": "maintenance"
    }

    await testing.make_task(
        _store(runtime),
        SystemClock().now(),
        id="waits",
        status="WAITING",
        stage=1,
        commands=[{"method": "a"}, Message(), {"method": "b"}],
        result=[{"ok": True}],
        user_id="alice",
    )
    answered = await client.tasks.write_message("waits", {"url": "http://example/r/1"})
    assert (answered["status"], answered["stage"]) == ("QUEUED", 2)
    assert answered["result"] == [{"ok": True}, {"url": "http://example/r/1"}]

    await client.tasks.delete("t1")
    assert await client.tasks.exists("t1") is False


def _call(method: str) -> dict[str, Any]:
    return {
        "kind": "call",
        "method": method,
        "params": None,
        "condition": None,
        "max_timeout": None,
    }


async def test_task_models_arrive_as_the_python_service_stores_them(
    client: TasksClient, runtime: TaskRuntime
):
    def task(task_id: str) -> Task:
        return Task(
            id=task_id,
            app="reports",
            commands=[
                TaskCommand(
                    method="[kws.method]",
                    params={"id": "[id]", "n": 2**62},
                    condition=Condition({"kws.n": {"gt": 1}}),
                    max_timeout=5,
                ),
                Timer(2.5),
                Message(max_timeout=60),
                {"method": "b", "params": ["[2.url]"]},
            ],
            kws={"method": "a.b", "n": 3},
            priority="HIGH",
            restart_policy="FIRST",
            max_retries=2,
            retry_delay=3,
            notify=True,
            description="from a model",
            meta={"source": "test"},
            expires_at=datetime(2040, 1, 1, tzinfo=UTC),
            enabled=False,
        )

    over_http = await client.tasks.create(task("http"))
    in_process = await runtime.tasks.create(task("local"), caller=ALICE)
    assert isinstance(in_process, dict)
    same = {"id", "job_id", "created", "status_change", "next_run", "root_id"}
    assert {k: v for k, v in over_http.items() if k not in same} == {
        k: v for k, v in in_process.items() if k not in same
    }
    assert over_http["commands"][0]["params"]["n"] == 2**62


async def test_every_notification_method_round_trips(client: TasksClient, runtime: TaskRuntime):
    now = SystemClock().now()
    rows = [
        await _store(runtime).insert_notification(
            testing.notification_row(now, task_id="t", user_id="alice", result=[i])
        )
        for i in range(3)
    ]
    first = rows[0]["id"]
    got = await client.notifications.get(first)
    assert (got["task_id"], got["result"], got["read"]) == ("t", [0], False)
    assert await client.notifications.get(first, ["result"]) == {"result": [0]}
    page = await client.notifications.list(
        conditions={"task_id": "t"}, sort=[{"desc": "id"}], columns=["result"], limit=2
    )
    assert (page["count"], page["data"]) == (3, [{"result": [2]}, {"result": [1]}])
    page = await client.notifications.list(offset=1, count=False, columns="id")
    assert (page["count"], page["on_page"]) == (None, 2)
    assert (await client.notifications.update(first, {"read": True}))["read"] is True
    unread = await client.notifications.update(first, NotificationUpdate(read=False))
    assert unread["read"] is False
    await client.notifications.delete(first)
    with pytest.raises(NotificationNotFound):
        await client.notifications.get(first)


# -- errors ----------------------------------------------------------------------------------------


async def _seed(runtime: TaskRuntime) -> int:
    """Alice's tasks ``mine`` (queued) and ``ended``, Bob's task and notification (its id)."""
    await runtime.tasks.create(
        [
            Task(id="mine", commands=[TaskCommand(method="x")]),
            Task(id="ended", commands=[TaskCommand(method="x")]),
        ],
        caller=ALICE,
    )
    await runtime.tasks.cancel("ended", caller=ALICE)
    await runtime.tasks.create(
        Task(id="bobs", commands=[TaskCommand(method="x")]), caller=Caller.user("bob")
    )
    row = await _store(runtime).insert_notification(
        testing.notification_row(SystemClock().now(), user_id="bob")
    )
    return int(row["id"])


BAD_TASK = {"commands": [{"method": "x"}], "max_retries": 99, "priority": 500, "max_retires": 1}
ONE = {"commands": [{"method": "x"}]}
VIEW = ("view_others",)

# name: (the call, made through the client and through the service, given Bob's notification id;
# the caller's permissions; the exception both raise)
ERROR_CASES: dict[str, tuple[Any, tuple[str, ...], type[KaijuTasksError]]] = {
    "missing task": (lambda api, n: api.tasks.get("ghost"), (), TaskNotFound),
    "another's task": (lambda api, n: api.tasks.get("bobs"), (), TaskNotFound),
    "cancel missing task": (lambda api, n: api.tasks.cancel("ghost"), (), TaskNotFound),
    "missing notification": (lambda api, n: api.notifications.get(4242), (), NotificationNotFound),
    "delete notification": (
        lambda api, n: api.notifications.delete(4242),
        (),
        NotificationNotFound,
    ),
    "id that exists": (lambda api, n: api.tasks.create({"id": "mine", **ONE}), (), Conflict),
    "cancel ended task": (lambda api, n: api.tasks.cancel("ended"), (), InvalidTransition),
    "unawaited message": (lambda api, n: api.tasks.write_message("mine", 1), (), InvalidTransition),
    "bad fields": (lambda api, n: api.tasks.create(BAD_TASK), (), ValidationError),
    "bad bulk": (lambda api, n: api.tasks.create([ONE, {"commands": []}]), (), ValidationError),
    "bad filter": (
        lambda api, n: api.tasks.list(conditions={"id": {"re": "x"}}),
        (),
        ValidationError,
    ),
    "bad column": (lambda api, n: api.tasks.get("mine", ["id", "nope"]), (), ValidationError),
    "bad update": (lambda api, n: api.tasks.update("mine", {"status": "X"}), (), ValidationError),
    "notification id": (lambda api, n: api.notifications.get(0), (), ValidationError),
    "system field": (lambda api, n: api.tasks.create({**ONE, "system": True}), (), ValidationError),
    "change another's": (
        lambda api, n: api.tasks.update("bobs", {"meta": {}}),
        VIEW,
        NotAuthorized,
    ),
    "another's notification": (lambda api, n: api.notifications.delete(n), VIEW, NotAuthorized),
}


@pytest.mark.parametrize(
    ("call", "permissions", "expected"),
    [pytest.param(*case, id=name) for name, case in ERROR_CASES.items()],
)
async def test_errors_are_the_python_services_own(
    runtime: TaskRuntime, server: Server, call, permissions, expected
):
    bobs = await _seed(runtime)
    service = TokenService(_store(runtime))
    user = "viewer" if permissions else "alice"
    token = (await service.create(user, list(permissions)))["token"]
    caller = Caller.user(user, permissions)
    with pytest.raises(expected) as local:
        await call(AsCaller(runtime, caller), bobs)
    async with TasksClient(server.url, token) as client:
        with pytest.raises(expected) as remote:
            await call(client, bobs)
    assert type(remote.value) is type(local.value)
    assert remote.value.message == local.value.message
    assert str(remote.value) == str(local.value)
    if isinstance(local.value, ValidationError):
        assert isinstance(remote.value, ValidationError)
        assert remote.value.field == local.value.field
        assert remote.value.errors == local.value.errors
        assert remote.value.data == local.value.data


async def test_validation_errors_name_their_fields(client: TasksClient):
    with pytest.raises(ValidationError) as caught:
        await client.tasks.create(BAD_TASK)
    assert caught.value.field == "max_retries"
    assert [e["field"] for e in caught.value.errors] == ["max_retries", "priority", "max_retires"]
    with pytest.raises(ValidationError) as caught:
        await client.tasks.create([{"commands": [{"method": "x"}]}, {"commands": [{"params": 1}]}])
    assert caught.value.field == "1.commands.0.method"
    with pytest.raises(ValidationError) as caught:  # refused before it leaves: not JSON
        await client.tasks.write_message("mine", {"when": object()})
    assert caught.value.field == "data"


async def test_a_bad_token_and_no_token_are_not_authorised(
    server: Server, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
):
    bad = "kt_" + "x" * 43
    async with TasksClient(server.url, bad) as client:
        with pytest.raises(NotAuthorized) as caught:
            await client.tasks.list()
        assert caught.value.message == "Not authorised."
        assert bad not in repr(client)
    with pytest.raises(NotAuthorized):  # a revoked token too
        await _revoked_call(server, tokens)
    monkeypatch.delenv(client_.TOKEN_ENV, raising=False)
    async with TasksClient(server.url) as client:
        with pytest.raises(NotAuthorized) as caught:
            await client.tasks.get("x")
    assert client_.TOKEN_ENV in caught.value.message  # says how to give one


async def _revoked_call(server: Server, tokens: dict[str, str]) -> None:
    service = server.api.tokens
    created = await service.create("carol")
    await service.revoke(created["id"])
    async with TasksClient(server.url, created["token"]) as client:
        await client.tasks.exists("x")


async def test_failed_authentications_end_in_rate_limiting(servers, tokens: dict[str, str]):
    server = servers(auth_failures=2, auth_window=600.0)
    await server.start()
    async with TasksClient(server.url, "kt_wrong") as client:
        for _ in range(2):
            with pytest.raises(NotAuthorized):
                await client.tasks.exists("x")
        with pytest.raises(RateLimited) as caught:
            await client.tasks.exists("x")  # retried? no: an answer, not a connection failure
    assert caught.value.code == -32008
    assert caught.value.retry_after is not None
    assert caught.value.retry_after >= 1
    assert isinstance(caught.value, RemoteError)
    assert "too many failed authentications" in caught.value.message
    # The address is refused, whatever token it sends, until the window refills.
    async with TasksClient(server.url, tokens["alice"]) as client:
        with pytest.raises(RateLimited):
            await client.tasks.exists("x")


async def test_other_errors_keep_their_code_and_data(servers, tokens: dict[str, str]):
    server = servers(max_body=2048)
    await server.start()
    async with TasksClient(server.url, tokens["alice"]) as client:
        with pytest.raises(RemoteError) as caught:  # HTTP 413
            await client.tasks.create({"commands": [{"method": "x"}], "description": "x" * 4000})
        assert (caught.value.code, caught.value.message) == (
            -32600,
            "request body larger than 2048 bytes",
        )
        with pytest.raises(RemoteError) as caught:
            await client.call("tasks.start", {"id": "x"})
        assert caught.value.code == -32601
        assert caught.value.data is None


async def test_a_url_that_is_not_the_api_is_unreachable(server: Server, tokens: dict[str, str]):
    async with TasksClient(server.url + "/elsewhere", tokens["alice"]) as client:
        assert client.endpoint == server.url + "/elsewhere/public/rpc"
        with pytest.raises(Unreachable) as caught:
            await client.tasks.get("x")
    assert "HTTP 404" in caught.value.message


# -- retries ---------------------------------------------------------------------------------------


class Dropper:
    """Reads each request and closes the connection without a reply: a server that crashes (or
    a connection lost) after the request arrived, so the call may have run."""

    def __init__(self) -> None:
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Dropper:
        self.server = await asyncio.start_server(self._drop, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _drop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"POST /public/rpc "):
            self.requests += 1
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


CALLS = {
    "tasks.create": lambda c: c.tasks.create({"commands": [{"method": "x"}]}),
    "tasks.get": lambda c: c.tasks.get("x"),
    "tasks.exists": lambda c: c.tasks.exists("x"),
    "tasks.list": lambda c: c.tasks.list(),
    "tasks.update": lambda c: c.tasks.update("x", {"description": "y"}),
    "tasks.delete": lambda c: c.tasks.delete("x"),
    "tasks.reset": lambda c: c.tasks.reset("x"),
    "tasks.copy": lambda c: c.tasks.copy("x"),
    "tasks.write_message": lambda c: c.tasks.write_message("x", 1),
    "tasks.cancel": lambda c: c.tasks.cancel("x"),
    "notifications.get": lambda c: c.notifications.get(1),
    "notifications.list": lambda c: c.notifications.list(),
    "notifications.update": lambda c: c.notifications.update(1, {"read": True}),
    "notifications.delete": lambda c: c.notifications.delete(1),
}


@pytest.mark.parametrize("method", sorted(CALLS))
async def test_only_calls_that_change_nothing_are_sent_again(method: str):
    assert set(CALLS) == set(rpc_server.SERVICE_METHODS)
    async with Dropper() as dropper, TasksClient(dropper.url, "kt_t", retries=2, backoff=0) as c:
        with pytest.raises(Unreachable) as caught:
            await CALLS[method](c)
    assert caught.value.sent is True  # it reached the server, which may have run it
    assert dropper.requests == (3 if method in client_.RETRIED else 1)
    assert "kt_t" not in str(caught.value)


async def test_get_is_retried_while_the_server_is_briefly_down(
    servers, runtime: TaskRuntime, tokens: dict[str, str], caplog: pytest.LogCaptureFixture
):
    await runtime.tasks.create(Task(id="kept", commands=[TaskCommand(method="x")]), caller=ALICE)
    server = servers()  # not started: connections are refused
    retried = asyncio.Event()

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if getattr(record, "event", None) == "client_retry":
                retried.set()

    seen = Seen()
    logging.getLogger("kaiju_tasks.client").addHandler(seen)
    try:
        # Enough retries to outlast any start-up: the test waits for one, then starts the server.
        async with TasksClient(
            server.url, tokens["alice"], retries=1000, backoff=0.05, timeout=60
        ) as client:
            getting = asyncio.create_task(client.tasks.get("kept", ["id"]))
            await asyncio.wait_for(retried.wait(), WITHIN)
            assert not getting.done()
            await server.start()
            assert await getting == {"id": "kept"}
    finally:
        logging.getLogger("kaiju_tasks.client").removeHandler(seen)
    lines = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "client_retry"]
    assert lines
    assert all("tasks.get: cannot reach" in line for line in lines)
    assert all(tokens["alice"] not in line for line in lines)


async def test_create_is_not_retried_while_the_server_is_down(
    servers, runtime: TaskRuntime, tokens: dict[str, str], caplog: pytest.LogCaptureFixture
):
    server = servers()  # not started: connections are refused
    async with TasksClient(server.url, tokens["alice"], retries=5, backoff=0) as client:
        with pytest.raises(Unreachable) as caught:
            await client.tasks.create({"id": "once", "commands": [{"method": "x"}]})
        assert caught.value.sent is False  # refused: it never left, so sending it again is safe
        assert not [r for r in caplog.records if getattr(r, "event", "") == "client_retry"]
        with pytest.raises(Unreachable):
            await client.tasks.exists("once")
        assert len([r for r in caplog.records if getattr(r, "event", "") == "client_retry"]) == 5
        await server.start()
        assert await client.tasks.exists("once") is False
        assert (await client.tasks.create({"id": "once", "commands": [{"method": "x"}]}))["id"]


# -- configuration --------------------------------------------------------------------------------


async def test_url_and_token_come_from_the_environment(
    server: Server, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(client_.URL_ENV, server.url + "/public/rpc/")
    monkeypatch.setenv(client_.TOKEN_ENV, tokens["alice"] + "\n")  # as read from a file
    async with TasksClient() as client:
        assert client.endpoint == server.url + "/public/rpc"
        assert await client.tasks.exists("x") is False
        assert tokens["alice"] not in repr(client)
        assert "token: set" in repr(client)
    monkeypatch.delenv(client_.URL_ENV)
    assert TasksClient().endpoint == "http://127.0.0.1:8080/public/rpc"


def test_unusable_settings_are_refused_without_showing_secrets(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(errors.ConfigError, match="http"):
        TasksClient("ftp://tasks.example")
    with pytest.raises(errors.ConfigError) as caught:
        TasksClient("http://user:hunter2@tasks.example:8080")
    assert "hunter2" not in caught.value.message
    monkeypatch.setenv(client_.TOKEN_ENV, "kt_secret part")
    with pytest.raises(errors.ConfigError) as caught:
        TasksClient("http://tasks.example")
    assert "secret" not in caught.value.message
    assert client_.TOKEN_ENV in caught.value.message


# -- the blocking client ---------------------------------------------------------------------------


async def test_the_sync_client_works_from_plain_threads(server: Server, tokens: dict[str, str]):
    def script() -> SyncTasksClient:
        with SyncTasksClient(server.url, tokens["alice"]) as client:
            task = client.tasks.create(Task(id="s1", commands=[TaskCommand(method="x")]))
            assert task["status"] == "QUEUED"
            assert client.tasks.create([{"commands": [{"method": "y"}]}], columns="id")[0]["id"]
            assert client.tasks.get("s1", ["id"]) == {"id": "s1"}
            assert client.tasks.exists("s1") is True
            assert client.tasks.list(conditions={"id": "s1"}, columns=["id"])["count"] == 1
            assert client.tasks.update("s1", {"description": "d"}, columns="description") == {
                "description": "d"
            }
            assert client.tasks.cancel("s1")["status"] == "FAILED"
            assert client.tasks.reset("s1")["status"] == "QUEUED"
            assert client.tasks.copy("s1", "reports")["app_name"] == "reports"
            with pytest.raises(InvalidTransition):
                client.tasks.write_message("s1", {"x": 1})
            client.tasks.delete("s1")
            with pytest.raises(TaskNotFound):
                client.tasks.get("s1")
            page = client.notifications.list(columns="id")
            assert page["count"] == 0
            with pytest.raises(NotificationNotFound):
                client.notifications.get(1)
            with pytest.raises(NotificationNotFound):
                client.notifications.update(1, {"read": True})
            with pytest.raises(NotificationNotFound):
                client.notifications.delete(1)
            # One client shared by many threads.
            with ThreadPoolExecutor(4) as pool:
                found = list(pool.map(lambda _: client.tasks.exists("s1"), range(16)))
            assert found == [False] * 16
        return client

    closed = await asyncio.to_thread(script)
    with pytest.raises(RuntimeError, match="closed"):
        closed.tasks.exists("s1")
    assert closed._thread is not None
    assert not closed._thread.is_alive()


async def test_the_sync_client_works_in_a_thread_whose_loop_is_running(
    server: Server, tokens: dict[str, str]
):
    client = SyncTasksClient(server.url, tokens["alice"])

    def in_a_loop() -> dict[str, Any]:
        async def view() -> dict[str, Any]:
            asyncio.get_running_loop()  # this thread's loop runs, and the call blocks it
            return client.tasks.create({"id": "from-loop", "commands": [{"method": "x"}]})

        return asyncio.run(view())

    try:
        created = await asyncio.to_thread(in_a_loop)
        assert created["id"] == "from-loop"
        assert await asyncio.to_thread(client.tasks.exists, "from-loop") is True
    finally:
        await asyncio.to_thread(client.close)


# -- the user guide over HTTP ----------------------------------------------------------------------


async def test_guide_templates_and_conditions_over_http(client: TasksClient):
    task = await client.tasks.create(
        Task(
            app="orders",
            id="my_task",
            commands=[
                TaskCommand(method="items.m_get", params={"conditions": {"marked": True}}),
                TaskCommand(method="[kws.command_name]", params={"id": "[0.data.id]"}),
                TaskCommand(method="settings.get"),
                TaskCommand(method="products.update_attributes"),
                TaskCommand(
                    method="products_cache.refresh",
                    condition=Condition({"3.count": {"gt": "[2.cache.update_threshold]"}}),
                ),
                TaskCommand(
                    method="products_cache.refresh",
                    condition={"3.count": {"lt": "[2.cache.update_threshold]"}},
                ),
                Timer(0.2),
            ],
            kws={"command_name": "items.m_delete"},
            notify=True,
        )
    )
    task = await ended(client, task["id"])
    assert (task["status"], task["exit_code"]) == ("FINISHED", 0)
    assert task["result"] == [
        {"data": [{"id": "001"}, {"id": "005"}]},
        {"deleted": ["001", "005"]},
        {"cache": {"update_threshold": 42}},
        {"count": 1000},
        "refreshed",
        None,  # its condition did not hold: skipped
        None,  # the timer
    ]

    page = await client.notifications.list(
        conditions={"task_id": task["id"], "job_id": task["job_id"]}, columns=["id", "result"]
    )
    assert [n["result"] for n in page["data"]] == [task["result"]]
    unread = await client.notifications.list(conditions={"read": False}, columns=["id"])
    for item in unread["data"]:
        await client.notifications.update(item["id"], {"read": True})
    assert (await client.notifications.list(conditions={"read": False}))["count"] == 0


async def test_guide_messages_cancel_and_reset_over_http(client: TasksClient):
    def report(task_id: str) -> Task:
        return Task(
            app="orders",
            id=task_id,
            commands=[
                TaskCommand(method="statistics.request_report", params={"callback_id": "[id]"}),
                Message(max_timeout=None),
                TaskCommand(method="files.download", params={"url": "[1.url]"}),
            ],
        )

    url = "http://statistics.example/reports/324934"
    await client.tasks.create(report("orders.report"))
    await waiting_at(client, "orders.report", 1)
    with pytest.raises(InvalidTransition):  # stages change only before or after a run
        await client.tasks.update("orders.report", {"commands": [{"method": "files.download"}]})
    task = await client.tasks.write_message(id="orders.report", data={"url": url})
    assert (task["status"], task["stage"]) == ("QUEUED", 2)
    task = await ended(client, "orders.report")
    assert task["result"] == [
        {"requested_for": "orders.report"},
        {"url": url},
        {"downloaded": url},
    ]

    await client.tasks.create(report("cancelled"))
    first = await waiting_at(client, "cancelled", 1)
    cancelled = await client.tasks.cancel("cancelled")
    assert (cancelled["status"], cancelled["exit_code"]) == ("FAILED", 130)
    with pytest.raises(InvalidTransition):
        await client.tasks.cancel("cancelled")
    with pytest.raises(InvalidTransition):
        await client.tasks.write_message("cancelled", {"url": url})
    reset = await client.tasks.reset("cancelled")
    assert (reset["status"], reset["stage"], reset["result"]) == ("QUEUED", 0, [])
    again = await waiting_at(client, "cancelled", 1)
    assert again["job_id"] not in (None, first["job_id"])
    await client.tasks.write_message("cancelled", {"url": url})
    assert (await ended(client, "cancelled"))["status"] == "FINISHED"

    finished = await client.tasks.list(
        conditions={"app_name": "orders", "status": "FINISHED"},
        sort=[{"desc": "id"}],
        columns=["id"],
    )
    assert finished["data"] == [{"id": "orders.report"}, {"id": "cancelled"}]
    either = await client.tasks.list(
        conditions=[{"id": {"like": "orders.%"}}, {"exit_code": 0, "id": "cancelled"}],
        columns=["id", "exit_code"],
    )
    assert either["data"] == [
        {"id": "cancelled", "exit_code": 0},
        {"id": "orders.report", "exit_code": 0},
    ]
    none = await client.tasks.list(conditions={"status": {"not": ["FINISHED"]}})
    assert none["count"] == 0


async def test_guide_retries_over_http(client: TasksClient):
    task = await client.tasks.create(
        Task(
            app="orders",
            id="server.sync",
            commands=[{"method": "server.sync"}],
            max_retries=3,
            restart_policy="CURRENT",
        )
    )
    assert (task["status"], task["max_retries"], task["restart_policy"]) == (
        "QUEUED",
        3,
        "CURRENT",
    )
    task = await ended(client, "server.sync")
    assert (task["status"], task["retries"], task["result"]) == ("FINISHED", 2, ["synced"])


async def test_guide_periodic_tasks_over_http(client: TasksClient):
    task = await client.tasks.create(
        Task(
            app="orders",
            id="cache.update",
            commands=[TaskCommand(method="cache.update")],
            cron="* * * * * *",  # every second (croniter's seconds field)
            notify=True,
        )
    )
    assert (task["status"], task["cron"]) == ("IDLE", "* * * * * *")  # waits for its first fire

    async def two_runs() -> dict[str, Any] | None:
        page = await client.notifications.list(
            conditions={"task_id": "cache.update"}, columns=["job_id", "result"]
        )
        return page if page["count"] >= 2 else None

    page = await testing.eventually(two_runs, within=WITHIN, what="two runs of the cron task")
    assert len({n["job_id"] for n in page["data"]}) == page["count"]  # a fresh job_id per run
    assert all(n["result"] == [{"updated": True}] for n in page["data"])
    stopped = await client.tasks.update("cache.update", {"enabled": False})
    assert stopped["enabled"] is False


async def test_guide_chaining_over_http(client: TasksClient):
    next_task = await client.tasks.create(
        Task(app="orders", commands=[TaskCommand(method="do.something.else")], enabled=False)
    )
    assert next_task["status"] == "IDLE"
    await client.tasks.update(next_task["id"], {"enabled": True, "cron": None})
    first_job = (await ended(client, next_task["id"]))["job_id"]
    task = await client.tasks.create(
        Task(app="orders", commands=[TaskCommand(method="do.something")], next_task=next_task["id"])
    )
    assert task["next_task"] == next_task["id"]
    assert (await ended(client, task["id"]))["result"] == [1]

    async def started_again() -> dict[str, Any] | None:
        current = await client.tasks.get(next_task["id"])
        return current if current["job_id"] != first_job else None

    await testing.eventually(started_again, within=WITHIN, what="the next task to start")
    assert (await ended(client, next_task["id"]))["result"] == [2]


async def test_guide_timers_free_the_executor_over_http(client: TasksClient, runtime: TaskRuntime):
    task = await client.tasks.create(
        Task(
            app="orders",
            id="orders.delete_expired",
            commands=[
                TaskCommand(method="orders.delete", params={"conditions": {"expired": True}}),
                Timer(1),
                TaskCommand(method="cache.clear", params=None),
            ],
        )
    )
    waiting = await waiting_at(client, task["id"], 1)
    # Parked: no executor holds it while the timer runs.
    assert waiting["executor_id"] is None
    assert waiting["wait_deadline"] is not None
    executor = runtime.executor
    assert executor is not None
    await testing.eventually(lambda: executor.active == 0, what="the executor to be free")
    task = await ended(client, task["id"])
    assert task["result"] == [{"deleted": 3}, None, True]


# -- docs/client.md -------------------------------------------------------------------------------


def _example(heading: str) -> str:
    text = DOCS.read_text(encoding="utf-8")
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, f"no example under {heading!r}"
    return found.group(1)


@pytest.mark.parametrize(
    ("heading", "printed"),
    [("Example", "FINISHED deleted 2 expired orders"), ("Blocking use", "not found")],
)
async def test_the_docs_examples_run_as_written(
    server: Server, tokens: dict[str, str], heading: str, printed: str
):
    env = {**os.environ, client_.URL_ENV: server.url, client_.TOKEN_ENV: tokens["alice"]}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _example(heading),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 90)
    assert process.returncode == 0, err.decode()
    assert printed in out.decode(), out.decode()


def test_integers_beyond_64_bits_are_read_as_integers():
    # orjson reads them as floats; the server sends them when an application method returns one.
    assert client_._decode(b'{"n": 123456789012345678901234567890}') == {
        "n": 123456789012345678901234567890
    }
    assert client_._decode(b'{"n": 1.5, "s": "x"}') == {"n": 1.5, "s": "x"}
