"""Application methods over HTTP: private by default, public or per permission when registered so.

Stages (the executor, in-process) call every registered method.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kaiju_tasks import errors, testing
from kaiju_tasks.methods import Methods
from kaiju_tasks.rpc import server as rpc_server
from kaiju_tasks.runtime import TaskRuntime


@pytest.fixture
def registry() -> Methods:
    methods = Methods()
    calls: list[str] = []

    @methods.register("app.private")
    def private() -> str:
        calls.append("private")
        return "private"

    @methods.register("app.public", public=True)
    def public() -> str:
        return "public"

    @methods.register("app.viewers", permission="view_others")
    def viewers() -> str:
        return "viewers"

    methods.calls = calls  # type: ignore[attr-defined]
    return methods


@pytest.fixture
async def rpc(aiohttp_client: Any, make_api: Any, registry: Methods) -> Any:
    api = make_api(methods=registry)
    client = await aiohttp_client(rpc_server.create_app(api))
    tokens = {
        "reader": (await api.tokens.create("reader"))["token"],
        "viewer": (await api.tokens.create("viewer", ["view_others"]))["token"],
        "system": (await api.tokens.create("root", ["system"]))["token"],
    }

    async def call(method: str, who: str) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": 1, "method": method}
        response = await client.post(
            "/public/rpc", data=json.dumps(body), headers={"Authorization": f"Bearer {tokens[who]}"}
        )
        assert response.status == 200
        reply: dict[str, Any] = await response.json()
        return reply

    call.client = client  # type: ignore[attr-defined]
    return call


async def test_a_plain_token_cannot_call_a_private_method(rpc, registry):
    reply = await rpc("app.private", "reader")
    assert reply["error"] == {
        "code": -32001,
        "message": "not allowed to call 'app.private'",
        "data": {"needs": "system"},
    }
    assert registry.calls == []  # the function never ran


async def test_a_method_with_a_permission_is_open_to_tokens_holding_it(rpc):
    assert (await rpc("app.viewers", "reader"))["error"]["data"] == {
        "needs": "permission view_others"
    }
    assert (await rpc("app.viewers", "viewer"))["result"] == "viewers"
    assert (await rpc("app.private", "viewer"))["error"]["code"] == -32001


async def test_a_public_method_is_open_to_every_valid_token(rpc):
    assert (await rpc("app.public", "reader"))["result"] == "public"


async def test_a_system_token_calls_every_method(rpc):
    for name in ("app.private", "app.public", "app.viewers"):
        assert (await rpc(name, "system"))["result"] == name.removeprefix("app.")


async def test_the_openrpc_document_says_who_may_call_each_method(rpc):
    document = await (await rpc.client.get("/public/rpc/openrpc.json")).json()
    access = {m["name"]: m.get("x-access") for m in document["methods"]}
    assert access["app.private"] == "system"
    assert access["app.public"] == "public"
    assert access["app.viewers"] == "permission view_others"


def test_an_unknown_permission_is_refused_at_registration():
    with pytest.raises(errors.ConfigError, match="unknown permission 'admin'"):
        Methods().register("x", permission="admin")


async def test_stages_call_private_methods(dsn, registry):
    async with TaskRuntime(dsn, methods=registry, manager=False) as runtime:
        task: Any = await runtime.tasks.create({"commands": [{"method": "app.private"}]})

        async def finished() -> Any:
            got = await runtime.tasks.get(task["id"], ["status", "result"])
            return got if got["status"] in ("FINISHED", "FAILED") else None

        got = await testing.eventually(finished, within=60, what="the task ended")
    assert (got["status"], got["result"]) == ("FINISHED", ["private"])
