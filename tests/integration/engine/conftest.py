"""The executor and manager together against a real PostgreSQL, with in-process and HTTP stages.

Fixtures: ``registry`` (in-process methods that record their calls in ``calls``), a running
``executor`` over it, and a ``manager`` to tick.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from kaiju_tasks.executor import Executor
from kaiju_tasks.manager import Manager
from kaiju_tasks.methods import MethodError, Methods


@pytest.fixture
def calls():
    return []


@pytest.fixture
def registry(calls):
    methods = Methods()
    state = {"flaky": 0}

    @methods.register("items.m_get")
    async def m_get(conditions):
        calls.append(("items.m_get", conditions))
        return {"data": [{"id": "001"}, {"id": "005"}, {"id": "101"}]}

    @methods.register("items.m_delete")
    def m_delete(id):
        calls.append(("items.m_delete", id))
        return {"deleted": len(id)}

    @methods.register("echo")
    def echo(**kw):
        calls.append(("echo", kw))
        return kw

    @methods.register("count")
    def count(n):
        return {"count": n}

    @methods.register("flaky")
    def flaky(fail_times):
        state["flaky"] += 1
        calls.append(("flaky", state["flaky"]))
        if state["flaky"] <= fail_times:
            raise MethodError("not yet", code=-32010, data={"attempt": state["flaky"]})
        return {"attempt": state["flaky"]}

    @methods.register("boom")
    def boom():
        raise ValueError("broken")

    @methods.register("hang")
    async def hang():
        calls.append(("hang", None))
        await asyncio.sleep(3600)

    return methods


@pytest.fixture
async def executor(store, registry, clock, dsn):
    ex = Executor(
        store,
        apps=["default", "orders"],
        methods=registry,
        clock=clock,
        dsn=dsn,
        poll_interval=timedelta(milliseconds=50),
        heartbeat_interval=timedelta(milliseconds=200),
        lease=timedelta(seconds=30),  # no lapse under load: a lapse abandons calls
    )
    async with ex:
        yield ex


@pytest.fixture
def manager(store, clock):
    return Manager(store, clock=clock)
