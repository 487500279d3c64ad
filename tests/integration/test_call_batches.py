"""Stage calls to one app gathered into JSON-RPC batch requests (``[apps] shop = URL batch=N``).

A real JSON-RPC service on loopback (``tests/rpc_fake.py``) answers batches and records them; an
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
from tests import rpc_fake

pytestmark = pytest.mark.timeout(90)


def shop(call: rpc_fake.Call) -> Any:
    """The app: ``shop.fail`` errs, ``shop.lost`` goes unanswered, the rest name their call."""
    params = call.params or {}
    if call.method == "shop.fail":
        raise rpc_fake.Fault(-32000, f"no stock for {params.get('n')}")
    if call.method == "shop.lost":
        return rpc_fake.NO_REPLY
    return {"n": params.get("n"), "by": call.method}


@pytest.fixture
async def service(rpc_target: Any) -> rpc_fake.RpcTarget:
    # A little latency, so that calls gather.
    return await rpc_target(shop, delay=0.005)


@pytest.fixture
async def runtime(dsn: str, service: rpc_fake.RpcTarget) -> Any:
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
    runtime: TaskRuntime, service: rpc_fake.RpcTarget
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
    assert len(service.calls) == 600
    assert set(service.count_by_id().values()) == {1}  # each call sent once
    assert service.requests < 600  # calls shared requests
    assert max(service.batch_sizes) > 1
    assert max(service.batch_sizes) <= 50  # app_batch bounds a request


async def test_batches_fill_past_concurrency_which_bounds_the_requests_in_flight(
    dsn: str, service: rpc_fake.RpcTarget
) -> None:
    # concurrency 2, batch 25: up to 2 requests in flight to the app, each of up to 25 calls
    # (the executor claims enough tasks to fill them), not 2 calls in flight.
    service.delay = 0.05
    async with TaskRuntime(
        dsn,
        apps=["shop"],
        app_urls={"shop": service.url},
        executor_options={
            "app_batch": {"shop": 25},
            "concurrency": 2,
            "poll_interval": timedelta(milliseconds=50),
        },
    ) as runtime:
        created = await runtime.tasks.create(
            [
                Task(app="shop", commands=[TaskCommand(method="shop.reserve", params={"n": n})])
                for n in range(200)
            ],
            columns=["id"],
        )
        assert isinstance(created, list)
        rows = await _ended(runtime, [row["id"] for row in created])
    assert {row["status"] for row in rows.values()} == {"FINISHED"}
    assert len(service.calls) == 200
    assert set(service.count_by_id().values()) == {1}
    assert service.max_open_requests <= 2
    assert max(service.batch_sizes) == 25  # full batches, past the 2 slots
    assert service.requests <= 200 // 25 * 3  # most requests were full


async def test_one_calls_error_stays_that_calls(
    runtime: TaskRuntime, service: rpc_fake.RpcTarget
) -> None:
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
    runtime: TaskRuntime, service: rpc_fake.RpcTarget
) -> None:
    def broken(call: rpc_fake.Call) -> Any:
        raise web.HTTPBadGateway(text="bad gateway")

    service.answer = broken
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
