"""OpenTelemetry tracing, when the ``opentelemetry-api`` package is installed (extra ``[otel]``).

Only the API is used: the SDK, its exporters and their settings are the application's choice
(``OTEL_*`` environment variables, or a ``TracerProvider`` set in code). Without the package,
every function here does nothing and nothing is imported.

What is traced:

- ``tasks.create`` (in Python, or over HTTP with a ``traceparent`` header) stores the caller's
  W3C trace context with the task (its ``trace`` column).
- Each run of a task (from a claim to its end, a park on a Timer or Message, or a failure) is a
  span ``run <app>``, a child of the creator's context; a run after the first (a retry, a
  resume after a Timer or Message) is linked to the run before it.
- Each stage call is a child span named after its method as written, with the task id,
  ``job_id``, app, stage, attempt and executor as attributes; a failure sets the span's status
  to ERROR. Calls over HTTP send ``traceparent`` (and ``tracestate``), so the called service's
  spans join the same trace; in-process methods run inside the stage's span.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

try:  # the optional dependency: everything below is a no-op without it
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised by a subprocess test without the package
    _trace = None  # type: ignore[assignment]

ENABLED = _trace is not None
"""Whether the OpenTelemetry API is installed."""

TRACER_NAME = "kaiju_tasks"
TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
MAX_TRACESTATE = 512
"""Longest ``tracestate`` kept (the W3C limit is 32 members; more is dropped, not an error)."""

_NULL = contextlib.nullcontext()
_recording = False
_UNKNOWN = object()
_PROVIDER_FROM_ENV = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
"""A provider named in the environment, which get_tracer_provider() loads on first use."""


def recording() -> bool:
    """Whether spans are made: the API is installed and an SDK's tracer provider is set.

    With the API alone every span would be a no-op object, yet making them costs each stage a
    few microseconds: without a provider, runs and stages make none (``carrier`` still stores
    a caller's context, for executors that do trace).
    """
    global _recording
    if _recording or not ENABLED:
        return _recording
    # While no provider is set, get_tracer_provider() looks in the environment on every call:
    # the module's global (what set_tracer_provider sets) and the variable as it was at import
    # answer first, without that cost. Once a provider is set it stays (it is set once).
    if getattr(_trace, "_TRACER_PROVIDER", _UNKNOWN) is None and not _PROVIDER_FROM_ENV:
        return False
    _recording = not isinstance(_trace.get_tracer_provider(), _trace.ProxyTracerProvider)
    return _recording


def carrier() -> dict[str, str] | None:
    """The W3C trace context to store with a new task, or None.

    The current context's: the active span, or an HTTP request's headers made current by
    :func:`attached`. Only a well-formed ``traceparent`` is kept, with its ``tracestate`` when
    short enough.
    """
    if not ENABLED or not _trace.get_current_span().get_span_context().is_valid:
        return None  # no span: no traceparent to write (the propagators cost a create ~3 %)
    found: dict[str, str] = {}
    _propagate.inject(found)
    parent = found.get("traceparent", "").strip().lower()
    if not TRACEPARENT.match(parent) or parent.split("-")[1] == "0" * 32:
        return None
    kept = {"traceparent": parent}
    state = found.get("tracestate", "").strip()
    if state and len(state) <= MAX_TRACESTATE:
        kept["tracestate"] = state
    return kept


@contextlib.contextmanager
def attached(headers: Mapping[str, str]) -> Iterator[None]:
    """Make the trace context of ``headers`` current (for a request's service calls)."""
    if not ENABLED or "traceparent" not in headers:
        yield
        return
    token = _context.attach(_propagate.extract(headers))
    try:
        yield
    finally:
        _context.detach(token)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add the current span's ``traceparent``/``tracestate`` to outgoing HTTP headers."""
    if recording():
        _propagate.inject(headers)


def run_span(row: Mapping[str, Any], executor_id: str) -> Any:
    """A context manager: the span of one run of the task ``row`` (current while it runs)."""
    if not recording():
        return _NULL
    stored = row.get("trace") or {}
    # No stored context: a root span, not a child of whatever span started the executor.
    parent = _propagate.extract(stored) if stored.get("traceparent") else _context.Context()
    links = []
    previous = stored.get("run")
    if isinstance(previous, str):
        span = _trace.get_current_span(_propagate.extract({"traceparent": previous}))
        if span.get_span_context().is_valid:
            links.append(_trace.Link(span.get_span_context()))
    return _trace.get_tracer(TRACER_NAME).start_as_current_span(
        f"run {row['app_name']}"[:128],
        context=parent,
        kind=_trace.SpanKind.CONSUMER,
        links=links,
        attributes=_attributes(row, executor_id, row["stage"]),
        record_exception=False,
        set_status_on_exception=False,
    )


def stage_span(row: Mapping[str, Any], executor_id: str, stage: int, method: str) -> Any:
    """A context manager: the span of one stage call (a child of the current run's span)."""
    if not recording():
        return _NULL
    attributes = _attributes(row, executor_id, stage)
    attributes["rpc.system"] = "jsonrpc"
    attributes["rpc.method"] = method[:256]
    return _trace.get_tracer(TRACER_NAME).start_as_current_span(
        method[:128] or "stage",
        kind=_trace.SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )


def failed(span: Any, message: str) -> None:
    """Mark ``span`` (what a ``*_span`` context manager gave) as failed with ``message``."""
    if ENABLED and span is not None:
        span.set_status(_trace.Status(_trace.StatusCode.ERROR, message[:1000]))


def current_span() -> Any:
    """The current span (None when no span is made)."""
    return _trace.get_current_span() if recording() else None


def current_run() -> str | None:
    """The ``traceparent`` of the current span (the run), to link the next run to it."""
    if not recording():
        return None
    context = _trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def _attributes(row: Mapping[str, Any], executor_id: str, stage: int) -> dict[str, Any]:
    return {
        "kaiju_tasks.task_id": str(row["id"])[:256],
        "kaiju_tasks.job_id": str(row.get("job_id") or ""),
        "kaiju_tasks.app": str(row["app_name"])[:256],
        "kaiju_tasks.stage": stage,
        "kaiju_tasks.attempt": int(row.get("retries") or 0),
        "kaiju_tasks.executor": executor_id,
    }
