"""Fuzzing /public/rpc: whatever arrives, no 5xx, no traceback, and the server stays healthy."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kaiju_tasks.methods import Methods
from kaiju_tasks.rpc import server as rpc_server
from kaiju_tasks.service import NotificationService, TaskService, TokenService

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
names = st.sampled_from([*rpc_server.SERVICE_METHODS, "app.echo", "nope", ""])
param_names = st.sampled_from(
    ["id", "data", "columns", "conditions", "sort", "offset", "limit", "count", "caller", "x"]
)
params = st.dictionaries(param_names, json_values, max_size=4) | st.lists(json_values, max_size=3)
calls = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "1.0"]), "method": names},
    optional={"id": st.integers(0, 100) | st.text(max_size=5), "params": params},
)
bodies = (
    calls.map(json.dumps)
    | st.lists(calls, min_size=1, max_size=5).map(json.dumps)
    | json_values.map(json.dumps)
    | st.binary(max_size=200)
)


@pytest.fixture
async def client(aiohttp_client, store, clock):
    methods = Methods()

    @methods.register("app.echo")
    def echo(*args, **kwargs):
        return [args, kwargs]

    async def health():
        return {"database": True}

    api = rpc_server.Api(
        tasks=TaskService(store, clock),
        notifications=NotificationService(store),
        tokens=TokenService(store, clock),
        methods=methods,
        health=health,
    )
    token = (await api.tokens.create("root", ["system"]))["token"]
    client = await aiohttp_client(rpc_server.create_app(api))
    client.token = token
    return client


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies)
async def test_any_body_gets_a_json_rpc_answer_and_never_a_5xx(client, body):
    response = await client.post(
        "/public/rpc", data=body, headers={"Authorization": f"Bearer {client.token}"}
    )
    text = await response.text()
    assert response.status in (200, 204), (response.status, text)
    assert "Traceback" not in text
    assert 'File "' not in text
    if response.status == 200:
        reply = json.loads(text)
        for item in reply if isinstance(reply, list) else [reply]:
            assert item["jsonrpc"] == "2.0"
            assert ("result" in item) != ("error" in item)
            if "error" in item:
                assert item["error"]["code"] != -32603, item  # nothing unexpected happened


async def test_server_is_healthy_after_the_fuzzing(client):
    response = await client.get("/health")
    assert response.status == 200
