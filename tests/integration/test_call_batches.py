"""Stage calls to one app gathered into JSON-RPC batch requests (``[apps] shop = URL batch=N``).

A real JSON-RPC service on loopback answers batches (and counts requests and calls); an
executor with ``app_batch`` runs many tasks at once. Every task must get its own result, the
calls must share requests, and one call's error must stay that call's.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web

from kaiju_tasks import Task, TaskCommand, TaskRuntime, config, errors

pytestmark = pytest.mark.timeout(90)


class Service:
    """Answers single calls and batches; ``shop.fail`` errs, ``shop.lost`` goes unanswered."""

    def __init__(self) -> None:
        self.url = ""
        self.requests = 0
        self.calls: Counter[str] = Counter()
        self.batch_sizes: list[int] = []
        self.broken = False

    def answer(self, call: dict[str, Any]) -> dict[str, Any] | None:
        self.calls[call["id"]] += 1
        method, params = call["method"], call.get("params") or {}
        if method == "shop.fail":
            error = {"code": -32000, "message": f"no stock for {params.get('n')}"}
            return {"jsonrpc": "2.0", "id": call["id"], "error": error}
        if method == "shop.lost":
            return None
        return {"jsonrpc": "2.0", "id": call["id"], "result": {"n": params.get("n"), "by": method}}

    async def rpc(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.broken:
            return web.Response(status=502, text="bad gateway")
        body = await request.json()
        await asyncio.sleep(0.005)  # a little latency, so that calls gather
        if isinstance(body, list):
            self.batch_sizes.append(len(body))
            replies = [r for r in map(self.answer, body) if r is not None]
            return web.json_response(replies)
        reply = self.answer(body)
        return web.json_response(reply)


@pytest.fixture
async def service(aiohttp_server: Any) -> Service:
    app = Service()
    web_app = web.Application()
    web_app.router.add_post("/rpc", app.rpc)
    server = await aiohttp_server(web_app)
    app.url = str(server.make_url("/rpc"))
    return app


@pytest.fixture
async def runtime(dsn: str, service: Service) -> Any:
    async with TaskRuntime(
        dsn,
        apps=["shop"],
        app_urls={"shop": service.url},
        manager_options={"interval": timedelta(milliseconds=100)},
        executor_options={
            "app_batch": {"shop": 50},
            "concurrency": 40,
            "poll_interval": timedelta(milliseconds=50),
        },
    ) as rt:
        yield rt


async def _ended(runtime: TaskRuntime, ids: list[str], within: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        page = await runtime.tasks.list(
            conditions={"id": ids}, columns=["id", "status", "result", "error"], limit=len(ids)
        )
        rows = {row["id"]: row for row in page["data"]}
        if all(row["status"] in ("FINISHED", "FAILED") for row in rows.values()):
            return rows
        assert time.monotonic() < deadline, Counter(row["status"] for row in rows.values())
        await asyncio.sleep(0.05)


async def test_many_tasks_share_requests_and_each_gets_its_own_result(
    runtime: TaskRuntime, service: Service
) -> None:
    tasks = [
        Task(
            app="shop",
            commands=[
                TaskCommand(method="shop.reserve", params={"n": n}),
                TaskCommand(method="shop.ship", params={"n": "[0.n]"}),
            ],
        )
        for n in range(300)
    ]
    created = await runtime.tasks.create(tasks, columns=["id"])
    assert isinstance(created, list)
    ids = [row["id"] for row in created]
    rows = await _ended(runtime, ids)
    for n, task_id in enumerate(ids):
        row = rows[task_id]
        assert row["status"] == "FINISHED"
        assert row["result"] == [{"n": n, "by": "shop.reserve"}, {"n": n, "by": "shop.ship"}]
    assert sum(service.calls.values()) == 600
    assert set(service.calls.values()) == {1}  # each call sent once
    assert service.requests < 600  # calls shared requests
    assert max(service.batch_sizes) > 1
    assert max(service.batch_sizes) <= 50  # app_batch bounds a request


async def test_one_calls_error_stays_that_calls(runtime: TaskRuntime, service: Service) -> None:
    tasks = [
        Task(app="shop", commands=[TaskCommand(method=method, params={"n": n})])
        for n, method in enumerate(["shop.reserve", "shop.fail", "shop.lost"] * 20)
    ]
    created = await runtime.tasks.create(tasks, columns=["id"])
    assert isinstance(created, list)
    rows = await _ended(runtime, [row["id"] for row in created])
    for n, row in enumerate(rows[task["id"]] for task in created):
        kind = n % 3
        if kind == 0:
            assert row["status"] == "FINISHED"
            assert row["result"] == [{"n": n, "by": "shop.reserve"}]
        elif kind == 1:
            assert row["status"] == "FAILED"
            assert row["error"]["message"] == f"no stock for {n}"
            assert row["error"]["code"] == -32000
        else:
            assert row["status"] == "FAILED"
            assert "without this call's reply" in row["error"]["message"]


async def test_a_failed_batch_request_fails_its_calls_as_transport_errors(
    runtime: TaskRuntime, service: Service
) -> None:
    service.broken = True
    created = await runtime.tasks.create(
        [Task(app="shop", commands=[TaskCommand(method="shop.reserve")]) for _ in range(5)],
        columns=["id"],
    )
    assert isinstance(created, list)
    rows = await _ended(runtime, [row["id"] for row in created])
    for row in rows.values():
        assert row["status"] == "FAILED"
        assert "HTTP 502" in row["error"]["message"]


def test_the_apps_option_reads_the_batch_size(tmp_path: Any) -> None:
    path = tmp_path / "kaiju-tasks.ini"
    path.write_text("[apps]\nshop = http://shop:8080/rpc batch=50\nmail = http://mail/rpc\n")
    settings, _ = config.load(paths=[], config_path=path, environ={})
    assert settings.apps == {"shop": "http://shop:8080/rpc", "mail": "http://mail/rpc"}
    assert settings.app_batch == {"shop": 50}
    for value, message in (
        ("http://shop/rpc batch=0", "batch must be 1-1000"),
        ("http://shop/rpc batch=many", "batch must be an integer"),
        ("http://shop/rpc size=5", "unknown option 'size=5'"),
    ):
        with pytest.raises(errors.ConfigError, match=message):
            config.load(paths=[], environ={"KAIJU_TASKS_APPS_SHOP": value})
    # A password with a space is not an option: no part of it is quoted.
    with pytest.raises(errors.ConfigError) as refused:
        config.load(paths=[], environ={"KAIJU_TASKS_APPS_SHOP": "http://u:top s3cret@shop/rpc"})
    assert "s3cret" not in str(refused.value)
