"""A user's bad input never fills the log: bounded lines, few tracebacks."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from kaiju_tasks.methods import Methods
from kaiju_tasks.rpc import server as rpc_server


@pytest.fixture
async def rpc(aiohttp_client: Any, make_api: Any) -> Any:
    methods = Methods()

    @methods.register("logs.value_error", public=True)
    def value_error(text: str) -> None:
        raise ValueError(text)

    @methods.register("logs.deep", public=True)
    def deep(value: Any) -> int:
        def depth(v: Any) -> int:
            return 1 + max((depth(c) for c in v), default=0) if isinstance(v, list) else 0

        return depth(value) + deep_recursion(0)

    def deep_recursion(n: int) -> int:
        return deep_recursion(n + 1)

    api = make_api(methods=methods)
    client = await aiohttp_client(rpc_server.create_app(api))
    token = (await api.tokens.create("alice"))["token"]

    async def call(method: str, params: Any) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        response = await client.post(
            "/public/rpc", data=json.dumps(body), headers={"Authorization": f"Bearer {token}"}
        )
        reply: dict[str, Any] = await response.json()
        return reply

    return call


async def test_an_internal_error_logs_one_bounded_line_and_one_traceback_a_minute(rpc, caplog):
    caplog.set_level(logging.ERROR, logger="kaiju_tasks.rpc.server")
    for _ in range(5):
        reply = await rpc("logs.value_error", ["x" * 500_000])
        assert reply["error"] == {"code": -32603, "message": "internal error"}
    records = [r for r in caplog.records if getattr(r, "event", None) == "rpc_error"]
    assert len(records) == 5
    lines = [caplog.handler.format(r) for r in records]
    assert sum("Traceback" in line for line in lines) == 1
    assert "in value_error" in lines[0]  # the traceback shows where it failed
    assert all(len(line) < 10_000 for line in lines)
    assert sum(len(line) for line in lines) < 15_000


async def test_a_recursion_error_is_invalid_params_without_a_traceback(rpc, caplog):
    caplog.set_level(logging.INFO)
    reply = await rpc("logs.deep", [[[[1]]]])
    assert reply["error"]["code"] == -32602
    assert reply["error"]["message"] == "params nested too deeply"
    assert "Traceback" not in caplog.text
    assert len(caplog.text) < 2000
