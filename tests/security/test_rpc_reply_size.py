"""The reply of one HTTP request, every call of a batch together, stays within reply_bytes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest

from kaiju_tasks import limits
from kaiju_tasks.rpc import server as rpc_server

REPLY_BYTES = 50_000
KWS_CHARS = 20_000  # one tasks.get of the task: a little over 20 KB


@pytest.fixture
def small_replies() -> Iterator[None]:
    before = limits.active()
    limits.configure(dataclasses.replace(before, reply_bytes=REPLY_BYTES))
    try:
        yield
    finally:
        limits.configure(before)


@pytest.fixture
async def rpc(aiohttp_client: Any, make_api: Any, small_replies: None) -> Any:
    api = make_api()
    client = await aiohttp_client(rpc_server.create_app(api))
    token = (await api.tokens.create("root", ["system"]))["token"]
    await api.tasks.create(
        {"id": "big", "commands": [{"method": "x"}], "kws": {"s": "a" * KWS_CHARS}}
    )

    async def post(body: Any) -> tuple[int, bytes]:
        response = await client.post(
            "/public/rpc", data=json.dumps(body), headers={"Authorization": f"Bearer {token}"}
        )
        return response.status, await response.read()

    return post


def _get(i: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": i, "method": "tasks.get", "params": {"id": "big"}}


async def test_a_batch_stops_at_reply_bytes_and_the_rest_is_refused_without_running(rpc):
    delete = {"jsonrpc": "2.0", "id": 9, "method": "tasks.delete", "params": {"id": "big"}}
    status, body = await rpc([_get(1), _get(2), _get(3), delete])
    assert status == 200
    assert len(body) <= REPLY_BYTES + 1000  # the small refusals are not counted
    replies = json.loads(body)
    assert [r["id"] for r in replies] == [1, 2, 3, 9]
    assert "result" in replies[0]
    assert "result" in replies[1]
    for refused in replies[2:]:
        assert refused["error"]["code"] == -32007
        assert refused["error"]["message"] == (
            "reply larger than reply_bytes (50,000 bytes): ask for fewer columns or a smaller limit"
        )
        assert refused["error"]["data"] == {"limit": "reply_bytes", "bytes": REPLY_BYTES}
    status, body = await rpc(
        {"jsonrpc": "2.0", "id": 1, "method": "tasks.exists", "params": {"id": "big"}}
    )
    assert json.loads(body)["result"] is True  # the refused delete never ran


async def test_a_single_call_over_reply_bytes_gets_an_error_not_a_5xx(rpc):
    limits.configure(dataclasses.replace(limits.active(), reply_bytes=10_000))
    status, body = await rpc(_get(1))
    assert status == 200
    assert json.loads(body)["error"]["code"] == -32007


async def test_fewer_columns_fit(rpc):
    status, body = await rpc(
        [{**_get(i), "params": {"id": "big", "columns": ["id", "status"]}} for i in range(50)]
    )
    assert status == 200
    assert all(r["result"] == {"id": "big", "status": "QUEUED"} for r in json.loads(body))
