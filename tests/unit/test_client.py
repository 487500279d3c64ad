"""The blocking client's methods are the async client's, run in its private loop (no network)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from kaiju_tasks import models
from kaiju_tasks.client import Notifications, SyncNotifications, SyncTasks, Tasks, TasksClient
from kaiju_tasks.service import NotificationService, TaskService

GROUPS = [(Tasks, SyncTasks), (Notifications, SyncNotifications)]


def _public(cls: type) -> set[str]:
    return {name for name in vars(cls) if not name.startswith("_")}


class Recorder:
    """A TasksClient whose ``call`` records what would be posted and answers ``{}``."""

    def __init__(self) -> None:
        self.client = TasksClient("http://127.0.0.1:9", "kt_t")
        self.calls: list[tuple[str, dict[str, Any]]] = []

        async def call(method: str, params: dict[str, Any]) -> Any:
            self.calls.append((method, params))
            return [{}] if method == "tasks.create" and isinstance(params["data"], list) else {}

        self.client.call = call  # type: ignore[method-assign]

    def run(self, call: Callable[[TasksClient], Coroutine[Any, Any, Any]]) -> Any:
        return asyncio.run(call(self.client))


@pytest.mark.parametrize(("async_group", "sync_group"), GROUPS)
def test_every_async_method_has_a_blocking_twin_with_its_params_and_docstring(
    async_group: type, sync_group: type
):
    assert _public(sync_group) == _public(async_group)
    sync = sync_group(Recorder().run)
    for name in _public(async_group):
        method = getattr(sync, name)
        assert not inspect.iscoroutinefunction(method)
        async_params = [*inspect.signature(getattr(async_group, name)).parameters.values()][1:]
        if name == "create":  # written out for its overloads: compare the implementation
            sync_params = [*inspect.signature(method).parameters.values()]
            assert [(p.name, p.kind, p.default) for p in sync_params] == [
                (p.name, p.kind, p.default) for p in async_params
            ]
            continue
        assert [*inspect.signature(method).parameters.values()] == async_params
        assert method.__doc__ == getattr(async_group, name).__doc__
        assert method.__name__ == name


TASK_CALLS = [
    ("create", ({"commands": [{"method": "x"}]},), {"columns": ["id"]}),
    ("create", ([{"commands": [{"method": "x"}]}],), {}),
    ("get", ("t", "status"), {}),
    ("exists", ("t",), {}),
    ("list", ({"app_name": "a"}, [{"desc": "created"}], 2, 5, False, ["id"]), {}),
    ("list", (), {"limit": 3, "columns": "id"}),
    ("update", ("t", models.TaskUpdate(description="d")), {"columns": "description"}),
    ("delete", ("t",), {}),
    ("reset", ("t",), {}),
    ("copy", ("t", "reports"), {"app": "x", "columns": ["id"]}),
    ("write_message", ("t", {"url": "u"}), {}),
    ("cancel", ("t",), {}),
]
NOTIFICATION_CALLS = [
    ("get", (1, ["id"]), {}),
    ("list", (), {"conditions": {"read": False}, "offset": 1}),
    ("update", (1, {"read": True}), {}),
    ("delete", (1,), {}),
]


@pytest.mark.parametrize(
    ("group", "sync_group", "calls"),
    [("tasks", SyncTasks, TASK_CALLS), ("notifications", SyncNotifications, NOTIFICATION_CALLS)],
)
def test_blocking_methods_send_and_return_what_the_async_methods_do(
    group: str, sync_group: type, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]
):
    recorder = Recorder()
    sync = sync_group(recorder.run)
    for name, args, kwargs in calls:
        async_result = asyncio.run(getattr(getattr(recorder.client, group), name)(*args, **kwargs))
        sync_result = getattr(sync, name)(*args, **kwargs)
        assert sync_result == async_result
        assert recorder.calls[-1] == recorder.calls[-2], name
    assert len(recorder.calls) == 2 * len(calls)


def test_blocking_calls_are_type_checked_like_the_async_ones():
    # Type-checked by mypy: a wrong argument here fails `make lint`, not this test.
    recorder = Recorder()
    tasks = SyncTasks(recorder.run)
    page: dict[str, Any] = tasks.list(limit=1, columns=["id"])
    created: list[dict[str, Any]] = tasks.create([{"commands": [{"method": "x"}]}])
    # The calls went out as the async ones send them, and their answers came back unchanged.
    assert [call[0] for call in recorder.calls] == ["tasks.list", "tasks.create"]
    assert (page, created) == ({}, [{}])


def _service_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(cls).items()
        if not name.startswith("_") and inspect.iscoroutinefunction(member)
    }


def _shape(signature: inspect.Signature) -> list[tuple[str, Any, Any]]:
    """Each param's name, kind and default: what a caller can pass (annotations aside)."""
    return [
        (p.name, p.kind, p.default)
        for p in signature.parameters.values()
        if p.name not in ("self", "caller")  # the server sets the caller from the token
    ]


@pytest.mark.parametrize(
    ("client_group", "service"), [(Tasks, TaskService), (Notifications, NotificationService)]
)
def test_the_clients_methods_have_the_python_services_names_and_params(
    client_group: type, service: type
):
    services = _service_methods(service)
    clients = _service_methods(client_group)
    assert set(clients) == set(services)
    for name, signature in services.items():
        assert _shape(clients[name]) == _shape(signature), name
