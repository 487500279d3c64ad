"""The blocking client: :class:`SyncTasksClient`, one private event loop in a daemon thread.

Its ``tasks`` and ``notifications`` are not written out a second time: each method is
``_Blocking(Tasks.get)`` and so on, a descriptor that takes its signature, docstring and result
type from the coroutine method and runs it in the private loop. ``mypy`` checks calls against
the async method's params through the ``ParamSpec``; only ``tasks.create`` is written out,
since its two overloads (one task, or a list) cannot pass through a ``ParamSpec``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import inspect
import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, Final, Generic, ParamSpec, Protocol, Self, TypeVar, overload

from kaiju_tasks.client import service, settings, transport

T = TypeVar("T")
P = ParamSpec("P")
Part = TypeVar("Part")  # an async method group: service.Tasks or service.Notifications


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _shutdown(
    loop: asyncio.AbstractEventLoop,
    thread: threading.Thread,
    client: transport.TasksClient,
    pid: int,
) -> None:
    """Close the client in its loop, stop the loop and its thread (not in a forked child)."""
    if os.getpid() != pid or loop.is_closed() or not thread.is_alive():
        return
    closing = asyncio.run_coroutine_threadsafe(client.close(), loop)
    with contextlib.suppress(Exception):
        closing.result(timeout=5)
    loop.call_soon_threadsafe(loop.stop)
    if thread is not threading.current_thread():
        thread.join(timeout=5)


class SyncTasksClient:
    """A blocking :class:`TasksClient`, for scripts, Django views and other code without a loop.

    Same arguments, same ``tasks`` and ``notifications`` methods (not coroutines), same results
    and exceptions. It runs one private event loop in a daemon thread (started on the first call,
    and again in a process forked after it), where one :class:`TasksClient` makes every call;
    the calling thread blocks until the result arrives. So it works:

    - in a thread that has no event loop (a script, a WSGI worker thread);
    - in a thread whose event loop is running (the call blocks that loop while it waits; in
      asyncio code use :class:`TasksClient` instead);
    - from many threads at once: share one instance (e.g. module level in a Django app).

    Call :meth:`close` (or use ``with SyncTasksClient() as client:``) to stop the thread; one
    left open is closed when it is garbage-collected or at interpreter exit.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = settings.DEFAULT_TIMEOUT,
        retries: int = settings.DEFAULT_RETRIES,
        backoff: float = settings.DEFAULT_BACKOFF,
    ) -> None:
        self._client = transport.TasksClient(
            url, token, timeout=timeout, retries=retries, backoff=backoff
        )
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._stop: weakref.finalize[Any, SyncTasksClient] | None = None
        self._closed = False
        self.endpoint: Final = self._client.endpoint
        """The JSON-RPC URL the calls are posted to."""
        self.tasks: Final = SyncTasks(self._run)
        """The methods of TaskService, blocking."""
        self.notifications: Final = SyncNotifications(self._run)
        """The methods of NotificationService, blocking."""

    def __repr__(self) -> str:
        return repr(self._client).replace(type(self._client).__name__, type(self).__name__, 1)

    def __enter__(self) -> SyncTasksClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the session and stop the private thread; later calls raise RuntimeError."""
        with self._lock:
            self._closed = True
            stop, self._stop = self._stop, None
        if stop is not None:
            stop()

    def _started(self) -> tuple[asyncio.AbstractEventLoop, transport.TasksClient]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{type(self).__name__} is closed")
            pid = os.getpid()
            if self._loop is None or self._pid != pid:
                if self._stop is not None:  # forked: the parent's thread does not exist here
                    self._stop.detach()
                    self._client = self._client._copy()
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=_serve, args=(loop,), name="kaiju-tasks-client", daemon=True
                )
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, pid
                self._stop = weakref.finalize(self, _shutdown, loop, thread, self._client, pid)
            return self._loop, self._client

    def _run(self, call: Callable[[transport.TasksClient], Coroutine[Any, Any, T]]) -> T:
        loop, client = self._started()
        if threading.current_thread() is self._thread:
            raise RuntimeError(f"{type(self).__name__} called from its own event loop")

        async def run() -> T:
            return await call(client)

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return future.result()
        except BaseException:  # e.g. KeyboardInterrupt while waiting: abandon the call
            future.cancel()
            raise


class _Runner(Protocol):
    """Runs a call of the async client in the private loop and returns its result."""

    def __call__(self, call: Callable[[transport.TasksClient], Coroutine[Any, Any, T]]) -> T: ...


class _SyncPart(Generic[Part]):
    """A blocking view of one method group of :class:`TasksClient`."""

    def __init__(self, run: _Runner) -> None:
        self._run = run

    def _part(self, client: transport.TasksClient) -> Part:
        """The async method group of ``client`` this view runs."""
        raise NotImplementedError


class _Blocking(Generic[Part, P, T]):
    """The blocking form of the coroutine method ``method`` of an async method group.

    ``get = _Blocking(Tasks.get)`` in a :class:`_SyncPart` gives a ``get`` with the params,
    docstring and result of ``Tasks.get`` (for mypy, ``inspect.signature`` and ``help``) that
    runs ``client.tasks.get(...)`` in the private loop and returns its result.
    """

    def __init__(self, method: Callable[Concatenate[Part, P], Coroutine[Any, Any, T]]) -> None:
        self._method = method
        self._name = method.__name__
        self.__doc__ = method.__doc__
        signature = inspect.signature(method)
        # The bound method's signature: without the async group's ``self``.
        self._signature = signature.replace(parameters=[*signature.parameters.values()][1:])

    def __repr__(self) -> str:
        return f"<blocking {self._method.__qualname__}>"

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self._name = name

    @overload
    def __get__(self, part: None, owner: type[Any]) -> Self: ...

    @overload
    def __get__(self, part: _SyncPart[Part], owner: type[Any] | None = None) -> Callable[P, T]: ...

    def __get__(
        self, part: _SyncPart[Part] | None, owner: type[Any] | None = None
    ) -> Self | Callable[P, T]:
        if part is None:
            return self
        method = self._method

        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            return part._run(lambda client: method(part._part(client), *args, **kwargs))

        call.__name__ = self._name
        call.__qualname__ = f"{type(part).__qualname__}.{self._name}"
        call.__doc__ = self.__doc__
        call.__signature__ = self._signature  # type: ignore[attr-defined]
        # Kept on the instance, which is looked up before this (non-data) descriptor.
        part.__dict__[self._name] = call
        return call


class SyncTasks(_SyncPart[service.Tasks]):
    """``sync_client.tasks``: :class:`Tasks`, blocking."""

    def _part(self, client: transport.TasksClient) -> service.Tasks:
        return client.tasks

    @overload
    def create(
        self, data: service.TaskData, *, columns: service.Columns = None
    ) -> dict[str, Any]: ...

    @overload
    def create(
        self, data: Sequence[service.TaskData], *, columns: service.Columns = None
    ) -> builtins.list[dict[str, Any]]: ...

    def create(
        self,
        data: service.TaskData | Sequence[service.TaskData],
        *,
        columns: service.Columns = None,
    ) -> dict[str, Any] | builtins.list[dict[str, Any]]:
        """Create one task, or many in one transaction when ``data`` is a list (never retried)."""
        return self._run(lambda c: c.tasks._create(data, columns))

    get = _Blocking(service.Tasks.get)
    exists = _Blocking(service.Tasks.exists)
    list = _Blocking(service.Tasks.list)
    update = _Blocking(service.Tasks.update)
    delete = _Blocking(service.Tasks.delete)
    reset = _Blocking(service.Tasks.reset)
    copy = _Blocking(service.Tasks.copy)
    write_message = _Blocking(service.Tasks.write_message)
    cancel = _Blocking(service.Tasks.cancel)


class SyncNotifications(_SyncPart[service.Notifications]):
    """``sync_client.notifications``: :class:`Notifications`, blocking."""

    def _part(self, client: transport.TasksClient) -> service.Notifications:
        return client.notifications

    get = _Blocking(service.Notifications.get)
    list = _Blocking(service.Notifications.list)
    update = _Blocking(service.Notifications.update)
    delete = _Blocking(service.Notifications.delete)
