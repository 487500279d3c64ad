"""The HTTP JSON-RPC API over real HTTP on loopback (aiohttp test server), real PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kaiju_tasks.methods import MethodError, Methods
from kaiju_tasks.rpc import server as rpc_server
from kaiju_tasks.service import NotificationService, TaskService, TokenService


@pytest.fixture
def registry():
    methods = Methods()

    @methods.register("app.add")
    def add(a, b):
        return a + b

    @methods.register("app.broken")
    def broken():
        raise RuntimeError("secret internals /etc/passwd")

    @methods.register("app.refuse")
    def refuse():
        raise MethodError("no way", code=-32050, data={"why": "because"})

    @methods.register("app.final")
    def final():
        raise MethodError("never", retryable=False)

    return methods


@pytest.fixture
async def api(store, clock, registry):
    async def health():
        return {"database": True, "leader": False, "status": "degraded"}

    return rpc_server.Api(
        tasks=TaskService(store, clock),
        notifications=NotificationService(store),
        tokens=TokenService(store, clock),
        methods=registry,
        health=health,
        max_body=64 * 1024,
        max_batch=10,
    )


@pytest.fixture
async def client(aiohttp_client, api):
    return await aiohttp_client(rpc_server.create_app(api))


@pytest.fixture
async def tokens(api):
    return {
        "system": (await api.tokens.create("root", ["system"]))["token"],
        "alice": (await api.tokens.create("alice"))["token"],
        "bob": (await api.tokens.create("bob"))["token"],
    }


class Rpc:
    def __init__(self, client, token):
        self.client = client
        self.token = token

    async def raw(self, body: Any, token: str | None = "default", headers=None):
        token = self.token if token == "default" else token
        all_headers = {"Authorization": f"Bearer {token}"} if token else {}
        all_headers.update(headers or {})
        data = body if isinstance(body, str | bytes) else json.dumps(body)
        response = await self.client.post("/public/rpc", data=data, headers=all_headers)
        text = await response.text()
        return response.status, (json.loads(text) if text else None)

    async def call(self, method: str, params: Any = None, **kw):
        body = {"jsonrpc": "2.0", "id": 1, "method": method}
        if params is not None:
            body["params"] = params
        _, reply = await self.raw(body, **kw)
        return reply

    async def ok(self, method: str, params: Any = None, **kw):
        reply = await self.call(method, params, **kw)
        assert "error" not in reply, reply
        return reply["result"]


@pytest.fixture
def rpc(client, tokens):
    return Rpc(client, tokens["system"])


TASK = {"commands": [{"method": "do.something"}], "id": "t1"}


async def test_every_task_method_over_http(rpc, store, clock, make_task):
    created = await rpc.ok("tasks.create", {"data": TASK})
    assert (created["id"], created["status"]) == ("t1", "QUEUED")
    many = await rpc.ok(
        "tasks.create", {"data": [{"commands": [{"method": "x"}]}] * 3, "columns": ["id"]}
    )
    assert len(many) == 3
    assert await rpc.ok("tasks.get", {"id": "t1", "columns": ["status"]}) == {"status": "QUEUED"}
    assert await rpc.ok("tasks.exists", {"id": "t1"}) is True
    page = await rpc.ok("tasks.list", {"conditions": {"id": "t1"}, "columns": ["id"]})
    assert (page["count"], page["data"]) == (1, [{"id": "t1"}])
    updated = await rpc.ok("tasks.update", {"id": "t1", "data": {"description": "hi"}})
    assert updated["description"] == "hi"
    cancelled = await rpc.ok("tasks.cancel", {"id": "t1"})
    assert (cancelled["status"], cancelled["exit_code"]) == ("FAILED", 130)
    reset = await rpc.ok("tasks.reset", {"id": "t1"})
    assert reset["status"] == "QUEUED"
    await make_task(
        id="my_task_id", status="WAITING", commands=[{"kind": "message"}, {"method": "a"}]
    )
    message = await rpc.ok(
        "tasks.write_message",
        {"id": "my_task_id", "data": {"url": "http://statistics.example/reports/324934"}},
    )
    assert message["result"] == [{"url": "http://statistics.example/reports/324934"}]
    assert await rpc.ok("tasks.delete", {"id": "t1"}) is None
    assert await rpc.ok("tasks.exists", {"id": "t1"}) is False


async def test_every_notification_method_over_http(rpc, store, clock):
    from kaiju_tasks import testing

    row = await store.insert_notification(testing.notification_row(clock.now(), task_id="t"))
    nid = row["id"]
    assert (await rpc.ok("notifications.get", {"id": nid}))["task_id"] == "t"
    page = await rpc.ok(
        "notifications.list", {"conditions": {"task_id": "t"}, "sort": [{"desc": "created"}]}
    )
    assert page["count"] == 1
    assert (await rpc.ok("notifications.update", {"id": nid, "data": {"read": True}}))["read"]
    assert await rpc.ok("notifications.delete", {"id": nid}) is None
    reply = await rpc.call("notifications.get", {"id": nid})
    assert reply["error"]["code"] == -32002


async def test_application_methods_are_served_too(rpc):
    assert await rpc.ok("app.add", {"a": 2, "b": 3}) == 5
    assert await rpc.ok("app.add", [2, 3]) == 5
    reply = await rpc.call("app.refuse")
    assert reply["error"] == {"code": -32050, "message": "no way", "data": {"why": "because"}}
    reply = await rpc.call("app.final")
    assert reply["error"]["data"] == {"retryable": False}


async def test_batch_and_notifications(rpc):
    status, replies = await rpc.raw(
        [
            {"jsonrpc": "2.0", "id": 1, "method": "app.add", "params": [1, 1]},
            {"jsonrpc": "2.0", "method": "tasks.create", "params": {"data": TASK}},
            {"jsonrpc": "2.0", "id": "x", "method": "nope"},
        ]
    )
    assert status == 200
    assert [r["id"] for r in replies] == [1, "x"]
    assert replies[0]["result"] == 2
    assert replies[1]["error"]["code"] == -32601
    assert await rpc.ok("tasks.exists", {"id": "t1"}) is True  # the notification ran
    status, reply = await rpc.raw({"jsonrpc": "2.0", "method": "app.add", "params": [1, 2]})
    assert (status, reply) == (204, None)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("{not json", -32700),
        ("[]", -32600),
        ('"a string"', -32600),
        ({"jsonrpc": "1.0", "id": 1, "method": "tasks.list"}, -32600),
        ({"jsonrpc": "2.0", "id": 1, "method": 5}, -32600),
        ({"jsonrpc": "2.0", "id": 1, "method": "tasks.list", "params": "x"}, -32600),
        ({"jsonrpc": "2.0", "id": 1, "method": "tasks.nope"}, -32601),
        ({"jsonrpc": "2.0", "id": 1, "method": "tasks.get", "params": {}}, -32602),
        (
            {"jsonrpc": "2.0", "id": 1, "method": "tasks.get", "params": {"id": "x", "oops": 1}},
            -32602,
        ),
        ({"jsonrpc": "2.0", "id": 1, "method": "tasks.get", "params": ["x"]}, -32602),
        ({"jsonrpc": "2.0", "id": 1, "method": "tasks.get", "params": {"id": "x"}}, -32002),
        ({"jsonrpc": "2.0", "id": 1, "method": "app.broken"}, -32603),
    ],
)
async def test_error_codes(rpc, body, code):
    status, reply = await rpc.raw(body)
    assert status == 200
    assert reply["error"]["code"] == code
    assert "Traceback" not in json.dumps(reply)
    assert "/etc/passwd" not in json.dumps(reply)


async def test_invalid_params_name_the_field(rpc):
    reply = await rpc.call(
        "tasks.create", {"data": {"commands": [{"method": "x"}], "max_retries": 99}}
    )
    assert reply["error"]["code"] == -32602
    assert reply["error"]["data"]["errors"][0]["field"] == "max_retries"
    reply = await rpc.call("tasks.get", {"id": "t", "extra": 1})
    assert reply["error"]["data"]["errors"][0]["field"] == "extra"


async def test_conflict_codes(rpc):
    await rpc.ok("tasks.create", {"data": TASK})
    assert (await rpc.call("tasks.create", {"data": TASK}))["error"]["code"] == -32003
    reply = await rpc.call("tasks.write_message", {"id": "t1", "data": 1})
    assert reply["error"]["code"] == -32003
    assert "not waiting for a message" in reply["error"]["message"]


async def test_missing_bad_and_revoked_tokens_are_not_authorised(rpc, api, tokens):
    for token in (None, "garbage", "kt_" + "x" * 43):
        reply = await rpc.call("tasks.list", token=token)
        assert reply["error"] == {"code": -32001, "message": "Not authorised."}
    created = await api.tokens.create("carol")
    assert "error" not in await rpc.call("tasks.list", token=created["token"])
    await api.tokens.revoke(created["id"])
    reply = await rpc.call("tasks.list", token=created["token"])
    assert reply["error"]["code"] == -32001


async def test_two_users_cannot_see_or_change_each_others_tasks(rpc, tokens):
    await rpc.ok("tasks.create", {"data": {**TASK, "id": "alices"}}, token=tokens["alice"])
    assert (await rpc.ok("tasks.list", token=tokens["bob"]))["count"] == 0
    for method, params in [
        ("tasks.get", {"id": "alices"}),
        ("tasks.cancel", {"id": "alices"}),
        ("tasks.delete", {"id": "alices"}),
    ]:
        reply = await rpc.call(method, params, token=tokens["bob"])
        assert reply["error"]["code"] == -32002
    assert (await rpc.ok("tasks.list", token=tokens["alice"]))["count"] == 1
    everything = await rpc.ok("tasks.list")  # the system token
    assert everything["data"][0]["user_id"] == "alice"


async def test_oversized_body_and_long_batch_are_refused(rpc):
    status, reply = await rpc.raw(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tasks.create",
            "params": {"data": {**TASK, "description": "x" * 70000}},
        }
    )
    assert status == 413
    assert reply["error"]["code"] == -32600
    status, reply = await rpc.raw(
        [{"jsonrpc": "2.0", "id": i, "method": "app.add", "params": [1, 1]} for i in range(11)]
    )
    assert reply["error"]["code"] == -32600


async def test_health_and_openrpc_description(client, api):
    response = await client.get("/health")
    assert response.status == 200
    assert (await response.json())["database"] is True
    response = await client.get("/public/rpc/openrpc.json")
    document = await response.json()
    names = {m["name"] for m in document["methods"]}
    assert set(rpc_server.SERVICE_METHODS) <= names
    assert "app.add" in names
    get = next(m for m in document["methods"] if m["name"] == "tasks.get")
    assert [(p["name"], p["required"]) for p in get["params"]] == [("id", True), ("columns", False)]
    assert "commands" in document["components"]["schemas"]["Task"]["properties"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("[" * 5000 + "]" * 5000, -32700),
        ('{"jsonrpc": "2.0", "id": 1, "method": "tasks.list", "params": {"limit": NaN}}', -32700),
        (
            '{"jsonrpc": "2.0", "id": 1, "method": "tasks.create", "params": {"data": '
            '{"commands": [{"method": "a\\u0000b"}]}}}',
            -32602,
        ),
        ({"jsonrpc": "2.0", "id": 1, "method": "tasks.list", "params": {"offset": 10**30}}, -32602),
        (
            {"jsonrpc": "2.0", "id": 1, "method": "notifications.get", "params": {"id": 10**30}},
            -32602,
        ),
    ],
)
async def test_hostile_bodies_get_clean_errors(client, rpc, body, code):
    status, reply = await rpc.raw(body)
    assert status == 200
    assert reply["error"]["code"] == code
    assert "$" not in reply["error"]["message"]  # no SQL placeholders leak


@pytest.mark.parametrize("field", ["enabled", "max_retries", "kws", "priority", "commands"])
async def test_null_for_a_field_that_always_holds_a_value_is_invalid_params(rpc, field):
    await rpc.ok("tasks.create", {"data": TASK})
    reply = await rpc.call("tasks.update", {"id": "t1", "data": {field: None}})
    assert reply["error"]["code"] == -32602
    assert reply["error"]["data"]["errors"] == [
        {"field": f"data.{field}", "message": "cannot be null"}
    ]


async def test_a_batch_runs_its_calls_one_after_another_in_array_order(rpc):
    # create, then an update sent as a notification, then a get: the get sees both.
    status, replies = await rpc.raw(
        [
            {"jsonrpc": "2.0", "id": 1, "method": "tasks.create", "params": {"data": TASK}},
            {
                "jsonrpc": "2.0",
                "method": "tasks.update",
                "params": {"id": "t1", "data": {"description": "batched"}},
            },
            {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "tasks.get",
                "params": {"id": "t1", "columns": ["id", "description"]},
            },
        ]
    )
    assert status == 200
    assert [r["id"] for r in replies] == [1, 3]
    assert replies[0]["result"]["id"] == "t1"
    assert replies[1]["result"] == {"id": "t1", "description": "batched"}


async def test_a_later_call_of_a_batch_starts_after_the_earlier_one_ended(rpc, registry):
    import asyncio

    events: list[str] = []

    @registry.register("app.slow")
    async def slow(name):
        events.append(f"start {name}")
        await asyncio.sleep(0.05)
        events.append(f"end {name}")
        return name

    _, replies = await rpc.raw(
        [{"jsonrpc": "2.0", "id": i, "method": "app.slow", "params": [str(i)]} for i in range(3)]
    )
    assert [r["result"] for r in replies] == ["0", "1", "2"]
    assert events == ["start 0", "end 0", "start 1", "end 1", "start 2", "end 2"]


@pytest.mark.parametrize(
    ("body", "message", "field", "reply_id"),
    [
        ({"id": 1, "method": "tasks.list"}, 'jsonrpc must be "2.0"', "jsonrpc", 1),
        (
            {"jsonrpc": "1.0", "id": 1, "method": "tasks.list"},
            'jsonrpc must be "2.0"',
            "jsonrpc",
            1,
        ),
        (
            {"jsonrpc": 2.0, "id": "a", "method": "tasks.list"},
            'jsonrpc must be "2.0"',
            "jsonrpc",
            "a",
        ),
        ({"jsonrpc": "2.0", "id": 1}, "method must be a string", "method", 1),
        ({"jsonrpc": "2.0", "id": 1, "method": 5}, "method must be a string", "method", 1),
        (
            {"jsonrpc": "2.0", "id": 1.5, "method": "tasks.list"},
            "id must be a string, an integer or null",
            "id",
            None,
        ),
        (
            {"jsonrpc": "2.0", "id": True, "method": "tasks.list"},
            "id must be a string, an integer or null",
            "id",
            None,
        ),
        (
            {"jsonrpc": "2.0", "id": 1, "method": "tasks.list", "params": "x"},
            "params must be an object or an array",
            "params",
            1,
        ),
        (
            {"jsonrpc": "2.0", "id": 1, "method": "tasks.list", "params": None},
            "params must be an object or an array",
            "params",
            1,
        ),
        ('"a string"', "a request must be a JSON object", None, None),
    ],
)
async def test_an_invalid_request_names_what_is_wrong(rpc, body, message, field, reply_id):
    status, reply = await rpc.raw(body)
    assert status == 200
    assert reply["id"] == reply_id
    assert reply["error"] == {
        "code": -32600,
        "message": f"invalid request: {message}",
        "data": {"field": field},
    }


async def test_an_invalid_member_of_a_batch_names_what_is_wrong(rpc):
    _, replies = await rpc.raw(
        [42, {"jsonrpc": "2.0", "id": 2, "method": "app.add", "params": [1, 1]}]
    )
    assert replies[0]["error"]["message"] == "invalid request: a request must be a JSON object"
    assert replies[1]["result"] == 2


LONE_SURROGATE_BODIES = [
    # (raw body, the field named in data.errors)
    (
        '{"jsonrpc": "2.0", "id": 1, "method": "tasks.list", '
        '"params": {"conditions": {"\\ud800": {}}}}',
        "conditions.\\ud800",
    ),
    (
        '{"jsonrpc": "2.0", "id": 1, "method": "tasks.create", "params": {"data": '
        '{"commands": [{"method": "x", "params": {"a": ["ok", "\\uDFFF"]}}]}}}',
        "data.commands.0.params.a.1",
    ),
    (
        '{"jsonrpc": "2.0", "id": 1, "method": "tasks.create", "params": {"data": '
        '{"commands": [{"method": "x", "condition": {"kws.\\udbff": {"eq": 1}}}]}}}',
        "data.commands.0.condition.kws.\\udbff",
    ),
]


@pytest.mark.parametrize(("body", "field"), LONE_SURROGATE_BODIES)
async def test_a_lone_surrogate_anywhere_is_invalid_params_naming_the_field(
    rpc, caplog, body, field
):
    status, reply = await rpc.raw(body)
    assert status == 200
    assert reply["error"]["code"] == -32602, reply
    assert reply["error"]["data"]["errors"][0]["field"] == field
    assert field in reply["error"]["message"]
    assert "Traceback" not in caplog.text


async def test_a_lone_surrogate_in_one_call_of_a_batch_leaves_the_others_alone(rpc):
    body = (
        '[{"jsonrpc": "2.0", "id": 1, "method": "tasks.list",'
        ' "params": {"conditions": {"\\ud800": 1}}},'
        ' {"jsonrpc": "2.0", "id": 2, "method": "app.add", "params": [2, 2]}]'
    )
    _, replies = await rpc.raw(body)
    assert replies[0]["error"]["code"] == -32602
    assert replies[1]["result"] == 4


async def test_escaped_text_that_is_valid_unicode_is_accepted(rpc):
    # a surrogate pair is one character (an emoji), not a lone surrogate
    body = (
        '{"jsonrpc": "2.0", "id": 1, "method": "tasks.create", "params": {"data": '
        '{"id": "e", "commands": [{"method": "x"}], "kws": {"\\ud83d\\ude00": "\\u05d0"}}}}'
    )
    _, reply = await rpc.raw(body)
    assert reply["result"]["kws"] == {"\U0001f600": "\u05d0"}


async def test_a_timeout_inside_a_method_is_not_reported_as_the_request_timing_out(rpc, registry):
    @registry.register("app.inner_timeout")
    async def inner():
        raise TimeoutError("the method's own call timed out")

    reply = await rpc.call("app.inner_timeout")
    assert reply["error"]["code"] == -32603
