"""OpenTelemetry: one trace from tasks.create through every stage to the called service.

The SDK records spans in memory. A caller's span (or an HTTP request's ``traceparent``) is
stored with the task; each run is a span under it, each stage a span under the run, and the
called service receives a ``traceparent`` of the same trace whose parent is the stage's span.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kaiju_tasks import Message, Task, TaskCommand, TaskRuntime, Timer, testing
from kaiju_tasks.methods import Methods

pytestmark = pytest.mark.timeout(60)

EXPORTER = InMemorySpanExporter()


def _provider() -> None:
    """Install the SDK once per process (OpenTelemetry allows one global provider)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        if not getattr(current, "_kaiju_test_exporter", False):
            current.add_span_processor(SimpleSpanProcessor(EXPORTER))
            current._kaiju_test_exporter = True  # type: ignore[attr-defined]
        return
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    provider._kaiju_test_exporter = True  # type: ignore[attr-defined]
    trace.set_tracer_provider(provider)


class Service:
    """A JSON-RPC app that records the traceparent of each call."""

    def __init__(self) -> None:
        self.url = ""
        self.seen: list[tuple[str, str | None]] = []
        self.flaky_failures = 1  # shop.flaky fails this many times, then answers

    async def rpc(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append((body["method"], request.headers.get("traceparent")))
        broken = body["method"] == "shop.broken"
        if body["method"] == "shop.flaky" and self.flaky_failures > 0:
            self.flaky_failures -= 1
            broken = True
        if broken:
            error = {"code": -32000, "message": "out of stock"}
            return web.json_response({"jsonrpc": "2.0", "id": body["id"], "error": error})
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": {"ok": True}})


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
    _provider()
    EXPORTER.clear()
    async with TaskRuntime(
        dsn,
        apps=["shop"],
        app_urls={"shop": service.url},
        manager_options={"interval": timedelta(milliseconds=100)},
        executor_options={"poll_interval": timedelta(milliseconds=100)},
    ) as rt:
        yield rt


async def _ended(runtime: TaskRuntime, task_id: str, within: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        task = await runtime.tasks.get(task_id)
        if task["status"] in ("FINISHED", "FAILED"):
            return task
        assert time.monotonic() < deadline, task["status"]
        await asyncio.sleep(0.02)


async def _spans(task_id: str, runs: int = 1, within: float = 30.0) -> list[Any]:
    """The task's finished spans, once ``runs`` run spans have ended.

    A task's status is committed before its run span ends, so a test that saw the status
    waits here for the span rather than reading the exporter at once.
    """
    deadline = time.monotonic() + within
    while True:
        spans = [
            s
            for s in EXPORTER.get_finished_spans()
            if (s.attributes or {}).get("kaiju_tasks.task_id") == task_id
        ]
        if sum(s.name.startswith("run ") for s in spans) >= runs:
            return spans
        assert time.monotonic() < deadline, [s.name for s in spans]
        await asyncio.sleep(0.02)


async def test_one_trace_from_create_through_every_stage_to_the_called_service(
    runtime: TaskRuntime, service: Service
) -> None:
    tracer = trace.get_tracer("the-application")
    with tracer.start_as_current_span("checkout") as checkout:
        created = await runtime.tasks.create(
            Task(
                app="shop",
                commands=[
                    TaskCommand(method="shop.reserve"),
                    TaskCommand(method="shop.charge"),
                    TaskCommand(method="shop.ship"),
                ],
            )
        )
    assert isinstance(created, dict)
    trace_id = checkout.get_span_context().trace_id
    assert created["trace"]["traceparent"].split("-")[1] == f"{trace_id:032x}"
    task = await _ended(runtime, created["id"])
    assert task["status"] == "FINISHED"
    spans = await _spans(created["id"])
    runs = [s for s in spans if s.name == "run shop"]
    stages = [s for s in spans if s.name != "run shop"]
    assert len(runs) == 1
    assert [s.name for s in sorted(stages, key=lambda s: s.start_time)] == [
        "shop.reserve",
        "shop.charge",
        "shop.ship",
    ]
    run = runs[0]
    assert run.parent is not None
    assert run.parent.span_id == checkout.get_span_context().span_id
    for span in spans:
        assert span.context.trace_id == trace_id
    for number, span in enumerate(sorted(stages, key=lambda s: s.start_time)):
        assert span.parent is not None
        assert span.parent.span_id == run.context.span_id
        attributes = dict(span.attributes or {})
        assert attributes["kaiju_tasks.stage"] == number
        assert attributes["kaiju_tasks.job_id"] == task["job_id"]
        assert attributes["kaiju_tasks.app"] == "shop"
        assert attributes["kaiju_tasks.attempt"] == 0
        assert attributes["kaiju_tasks.executor"] == task["executor_id"]
        assert span.status.is_ok
    # The called service got each stage's context: same trace, the stage's span as parent.
    by_method = {s.name: s for s in stages}
    assert len(service.seen) == 3
    for method, traceparent in service.seen:
        assert traceparent is not None
        _version, got_trace, parent_span, _flags = traceparent.split("-")
        assert got_trace == f"{trace_id:032x}"
        assert parent_span == f"{by_method[method].context.span_id:016x}"


async def test_a_failed_stage_marks_its_span_and_the_run(runtime: TaskRuntime) -> None:
    created = await runtime.tasks.create(
        Task(app="shop", commands=[TaskCommand(method="shop.broken")])
    )
    assert isinstance(created, dict)
    task = await _ended(runtime, created["id"])
    assert task["status"] == "FAILED"
    spans = await _spans(created["id"])
    stage = next(s for s in spans if s.name == "shop.broken")
    run = next(s for s in spans if s.name == "run shop")
    assert stage.status.status_code == trace.StatusCode.ERROR
    assert "out of stock" in (stage.status.description or "")
    assert run.status.status_code == trace.StatusCode.ERROR


async def test_a_resumed_task_starts_a_new_run_linked_to_the_one_before(
    runtime: TaskRuntime,
) -> None:
    with trace.get_tracer("the-application").start_as_current_span("signup") as signup:
        created = await runtime.tasks.create(
            Task(
                app="shop",
                commands=[
                    TaskCommand(method="shop.reserve"),
                    Message(),
                    TaskCommand(method="shop.ship"),
                ],
            )
        )
    assert isinstance(created, dict)
    deadline = time.monotonic() + 30
    while (await runtime.tasks.get(created["id"], ["status"]))["status"] != "WAITING":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await runtime.tasks.write_message(created["id"], {"confirmed": True})
    task = await _ended(runtime, created["id"])
    assert task["status"] == "FINISHED"
    runs = await _two_linked_runs(created["id"])
    for run in runs:  # both runs stay in the creator's trace
        assert run.context.trace_id == signup.get_span_context().trace_id


async def test_a_traceparent_header_on_create_over_http_is_the_tasks_parent(
    runtime: TaskRuntime, aiohttp_client: Any
) -> None:
    app, token = await _http_api(runtime)
    client = await aiohttp_client(app)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    reply = await client.post(
        "/public/rpc",
        json={
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tasks.create",
            "params": {"data": {"app": "shop", "commands": [{"method": "shop.reserve"}]}},
        },
        headers={
            "traceparent": parent,
            "tracestate": "vendor=1",
            "Authorization": f"Bearer {token}",
        },
    )
    body = await reply.json()
    assert "result" in body, body
    created = body["result"]
    assert created["trace"] == {"traceparent": parent, "tracestate": "vendor=1"}
    await _ended(runtime, created["id"])
    run = next(s for s in await _spans(created["id"]) if s.name == "run shop")
    assert f"{run.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert run.parent is not None
    assert f"{run.parent.span_id:016x}" == "b7ad6b7169203331"


def test_without_opentelemetry_nothing_is_traced_or_imported() -> None:
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if the package were not installed\n"
        "import kaiju_tasks, kaiju_tasks.executor, kaiju_tasks.service, kaiju_tasks.rpc.server\n"
        "import kaiju_tasks.client\n"
        "from kaiju_tasks import tracing\n"
        "assert tracing.ENABLED is False\n"
        "assert tracing.carrier() is None and tracing.current_run() is None\n"
        "row = {'id': 't', 'app_name': 'a', 'stage': 0}\n"
        "with tracing.run_span(row, 'e') as span, tracing.stage_span(row, 'e', 0, 'm'):\n"
        "    assert span is None\n"
        "headers = {}\n"
        "tracing.inject(headers)\n"
        "assert headers == {}\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry.')]\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


def test_with_the_api_alone_no_span_is_made_but_a_callers_context_is_kept() -> None:
    code = (
        "from kaiju_tasks import tracing\n"
        "assert tracing.ENABLED and not tracing.recording()  # no SDK provider set\n"
        "row = {'id': 't', 'app_name': 'a', 'stage': 0}\n"
        "with tracing.run_span(row, 'e') as span:\n"
        "    assert span is None\n"
        "parent = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'\n"
        "with tracing.attached({'traceparent': parent}):\n"
        "    assert tracing.carrier() == {'traceparent': parent}\n"
        "with tracing.attached({'traceparent': 'nonsense'}):\n"
        "    assert tracing.carrier() is None\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


async def test_a_task_created_outside_any_trace_runs_as_a_root_span(
    dsn: str, service: Service
) -> None:
    _provider()
    EXPORTER.clear()
    runtime = TaskRuntime(
        dsn,
        apps=["shop"],
        app_urls={"shop": service.url},
        manager=False,
        executor_options={"poll_interval": timedelta(milliseconds=100)},
    )
    # Started inside the application's span: its executor's tasks inherit that context.
    with trace.get_tracer("the-application").start_as_current_span("startup"):
        await runtime.start()
    try:
        created = await runtime.tasks.create(
            Task(app="shop", commands=[TaskCommand(method="shop.reserve")])
        )
        assert isinstance(created, dict)
        assert created["trace"] is None
        await _ended(runtime, created["id"])
    finally:
        await runtime.stop()
    run = next(s for s in await _spans(created["id"]) if s.name == "run shop")
    assert run.parent is None  # a root: not a child of the span that started the executor


async def test_a_retried_task_starts_a_new_run_linked_to_the_failed_one(
    runtime: TaskRuntime, service: Service
) -> None:
    with trace.get_tracer("the-application").start_as_current_span("order") as order:
        created = await runtime.tasks.create(
            Task(app="shop", max_retries=1, commands=[TaskCommand(method="shop.flaky")])
        )
    assert isinstance(created, dict)
    task = await _ended(runtime, created["id"])
    assert (task["status"], task["retries"]) == ("FINISHED", 1)
    first, second = runs = await _two_linked_runs(created["id"])
    assert first.status.status_code == trace.StatusCode.ERROR
    assert second.status.is_ok
    assert [dict(s.attributes or {})["kaiju_tasks.attempt"] for s in runs] == [0, 1]
    for run in runs:  # both attempts stay in the creator's trace
        assert run.context.trace_id == order.get_span_context().trace_id


async def test_a_task_resumed_after_a_timer_starts_a_new_run_linked_to_the_one_before(
    runtime: TaskRuntime,
) -> None:
    created = await runtime.tasks.create(
        Task(
            app="shop",
            commands=[
                TaskCommand(method="shop.reserve"),
                Timer(0.2),
                TaskCommand(method="shop.ship"),
            ],
        )
    )
    assert isinstance(created, dict)
    task = await _ended(runtime, created["id"])
    assert task["status"] == "FINISHED"
    first, second = await _two_linked_runs(created["id"])
    assert dict(second.attributes or {})["kaiju_tasks.stage"] == 2  # resumed after the timer
    # No creator's trace: each run is a root, the link is what ties them together.
    assert first.parent is None
    assert second.parent is None


async def test_an_in_process_methods_own_span_is_a_child_of_its_stage_span(dsn: str) -> None:
    _provider()
    EXPORTER.clear()
    registry = Methods()

    @registry.register("shop.price")
    async def price() -> int:
        with trace.get_tracer("the-application").start_as_current_span("price lookup"):
            return 42

    async with TaskRuntime(
        dsn,
        apps=["shop"],
        methods=registry,
        manager=False,
        executor_options={"poll_interval": timedelta(milliseconds=100)},
    ) as runtime:
        created = await runtime.tasks.create(
            Task(app="shop", commands=[TaskCommand(method="shop.price")])
        )
        assert isinstance(created, dict)
        assert (await _ended(runtime, created["id"]))["result"] == [42]
        spans = await _spans(created["id"])
    stage = next(s for s in spans if s.name == "shop.price")
    run = next(s for s in spans if s.name == "run shop")
    lookup = await testing.eventually(
        lambda: next((s for s in EXPORTER.get_finished_spans() if s.name == "price lookup"), None),
        within=10,
        what="the method's span",
    )
    assert lookup.parent is not None
    assert lookup.parent.span_id == stage.context.span_id
    assert stage.parent is not None
    assert stage.parent.span_id == run.context.span_id
    assert lookup.context.trace_id == stage.context.trace_id == run.context.trace_id


async def test_tasks_created_through_the_client_inside_a_span_join_its_trace(
    runtime: TaskRuntime, aiohttp_server: Any
) -> None:
    from kaiju_tasks.client import SyncTasksClient, TasksClient

    app, token = await _http_api(runtime)
    server = await aiohttp_server(app)
    url = str(server.make_url("/"))
    task = Task(app="shop", commands=[TaskCommand(method="shop.reserve")])
    tracer = trace.get_tracer("the-application")

    async with TasksClient(url, token) as client:
        outside = await client.tasks.create(task)
        with tracer.start_as_current_span("checkout") as checkout:
            inside = await client.tasks.create(task)
    with (
        SyncTasksClient(url, token) as sync_client,
        tracer.start_as_current_span("script") as script,
    ):
        # A thread of its own, as a script's: the blocking client runs the call in its own
        # thread and event loop, with the calling thread's context (asyncio copies it).
        blocking = await asyncio.to_thread(sync_client.tasks.create, task)

    assert outside["trace"] is None  # no span: nothing sent, nothing stored
    for created, span in ((inside, checkout), (blocking, script)):
        context = span.get_span_context()
        _version, trace_id, parent_id, _flags = created["trace"]["traceparent"].split("-")
        assert (trace_id, parent_id) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
        await _ended(runtime, created["id"])
        run = next(s for s in await _spans(created["id"]) if s.name == "run shop")
        assert run.context.trace_id == context.trace_id
        assert run.parent is not None
        assert run.parent.span_id == context.span_id


async def _http_api(runtime: TaskRuntime) -> tuple[Any, str]:
    """The HTTP API over ``runtime``'s services, and a system token for it."""
    from kaiju_tasks.methods import Methods
    from kaiju_tasks.rpc import server as rpc_server
    from kaiju_tasks.service import TokenService

    assert runtime.store is not None
    tokens = TokenService(runtime.store)

    async def health() -> dict[str, bool]:
        return {"database": True}

    api = rpc_server.Api(
        tasks=runtime.tasks,
        notifications=runtime.notifications,
        tokens=tokens,
        methods=Methods(),
        health=health,
    )
    token = (await tokens.create("ops", ["system"]))["token"]
    return rpc_server.create_app(api), token


async def _two_linked_runs(task_id: str) -> list[Any]:
    """The task's two run spans, in order; the second is linked to the first."""
    runs = sorted(
        (s for s in await _spans(task_id, runs=2) if s.name == "run shop"),
        key=lambda s: s.start_time,
    )
    assert len(runs) == 2
    first, second = runs
    assert [link.context.span_id for link in second.links] == [first.context.span_id]
    return runs
