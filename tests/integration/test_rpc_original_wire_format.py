"""tasks.create over HTTP with the original kaiju-tasks stage spellings, and stage references.

The original client serialises ``Timer(n)`` as ``{"method": "_TIMER_", "params": {"timer": n}}``
and ``Message()`` as ``{"method": "_MESSAGE_"}``. Sent to ``/public/rpc``, they are stored as
the timer and message stages, and a real executor and manager (direct PostgreSQL, no pgbouncer)
park and resume the task as such. A template reading a stage that has not run yet is refused.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager
from kaiju_tasks.methods import Methods
from kaiju_tasks.rpc import server as rpc_server
from tests.integration.engine.support import wait_for


@pytest.fixture
def methods() -> Methods:
    registry = Methods()

    @registry.register("app.echo")
    def echo(**kw: Any) -> dict[str, Any]:
        return kw

    return registry


@pytest.fixture
async def rpc(aiohttp_client, make_api, methods):
    api = make_api(methods=methods)
    token = (await api.tokens.create("alice"))["token"]
    client = await aiohttp_client(rpc_server.create_app(api))

    async def call(method: str, params: Any) -> dict[str, Any]:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        response = await client.post(
            "/public/rpc", data=json.dumps(body), headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status == 200
        reply: dict[str, Any] = json.loads(await response.text())
        return reply

    return call


@pytest.fixture
async def executor(store, clock, dsn, methods):
    async with Executor(
        store,
        methods=methods,
        clock=clock,
        dsn=dsn,
        poll_interval=timedelta(milliseconds=50),
        heartbeat_interval=timedelta(milliseconds=200),
        lease=timedelta(seconds=30),  # no lapse under load: a lapse abandons calls
    ) as ex:
        yield ex


async def test_a_timer_in_the_original_spelling_is_stored_parks_and_resumes_as_a_timer(
    rpc, store, clock, executor
):
    reply = await rpc(
        "tasks.create",
        {
            "data": {
                "id": "timed",
                "commands": [
                    {"method": "_TIMER_", "params": {"timer": 30}},
                    {"method": "app.echo", "params": {"after": "timer"}},
                ],
            }
        },
    )
    assert "error" not in reply, reply
    timer = {"kind": "timer", "seconds": 30.0, "condition": None}
    assert reply["result"]["commands"][0] == timer
    got = await rpc("tasks.get", {"id": "timed", "columns": ["commands"]})
    assert got["result"]["commands"][0] == timer  # stored in the full form

    row = await wait_for(store, "timed", "WAITING")
    assert (row["stage"], row["executor_id"]) == (0, None)  # parked, no executor holds it
    assert row["wait_deadline"] == clock.now() + timedelta(seconds=30)
    manager = Manager(store, clock=clock)
    assert (await manager.tick(clock.now()))["release_timers"] == 0
    clock.advance(30)
    assert (await manager.tick(clock.now()))["release_timers"] == 1
    row = await wait_for(store, "timed", "FINISHED")
    assert row["result"] == [None, {"after": "timer"}]


async def test_a_message_in_the_original_spelling_waits_for_tasks_write_message(
    rpc, store, executor
):
    reply = await rpc(
        "tasks.create",
        {
            "data": {
                "id": "waits",
                "commands": [
                    {"method": "_MESSAGE_", "max_timeout": 600},
                    {"method": "app.echo", "params": {"got": "[0.text]"}},
                ],
            },
            "columns": ["commands"],
        },
    )
    assert "error" not in reply, reply
    message = {"kind": "message", "max_timeout": 600.0, "condition": None}
    assert reply["result"]["commands"][0] == message

    await wait_for(store, "waits", "WAITING")
    written = await rpc("tasks.write_message", {"id": "waits", "data": {"text": "hello"}})
    assert "error" not in written, written
    row = await wait_for(store, "waits", "FINISHED")
    assert row["result"] == [{"text": "hello"}, {"got": "hello"}]


@pytest.mark.parametrize(
    ("commands", "field", "stage", "reader"),
    [
        ([{"method": "a"}, {"method": "b", "params": {"x": "[5.foo]"}}], "commands.1.params", 5, 1),
        ([{"method": "a", "params": {"x": "[0.id]"}}], "commands.0.params", 0, 0),
        ([{"method": "[1.name]"}, {"method": "b"}], "commands.0.method", 1, 0),
    ],
    ids=["later-stage", "own-stage", "in-the-method"],
)
async def test_a_template_reading_a_stage_that_has_not_run_is_refused_naming_the_field(
    rpc, store, commands, field, stage, reader
):
    reply = await rpc("tasks.create", {"data": {"id": "early", "commands": commands}})
    error = reply["error"]
    assert error["code"] == -32602, error
    assert error["data"]["errors"][0]["field"] == field
    assert (
        f"reads the result of stage {stage}, which has not run when stage {reader} starts"
        in (error["message"])
    )
    assert await store.get_task("early") is None  # nothing was created
