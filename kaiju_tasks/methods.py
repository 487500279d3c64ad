"""The registry of methods a process serves: stages call them in-process, the HTTP server too.

```python
methods = Methods()

@methods.register("orders.delete")
async def delete_orders(conditions: dict) -> dict:
    ...
```

Params are passed as keyword arguments (a JSON object), positional arguments (a list) or none.
A method raises :class:`MethodError` to answer with a JSON-RPC error of its choosing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kaiju_tasks import errors
from kaiju_tasks.rpc import protocol

Method = Callable[..., Any]
F = TypeVar("F", bound=Method)


class MethodError(Exception):
    """Raised by a method to answer with a JSON-RPC error ``code``, ``message`` and ``data``.

    ``retryable=False`` tells the executor that retrying the task cannot help.
    """

    def __init__(
        self, message: str, *, code: int = -32000, data: Any = None, retryable: bool = True
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.data = data
        self.retryable = retryable


class Reject(Exception):
    """Raised by a stage method to reject its task (Celery's ``Reject``).

    ``requeue=False`` fails the task at once, without using its retries (``task-rejected``);
    ``requeue=True`` puts it back in the queue without counting a retry, at most
    ``models.MAX_REQUEUES`` times. Over HTTP it is the JSON-RPC error -32005 with
    ``data = {"requeue": ...}``.
    """

    def __init__(self, reason: str = "rejected", *, requeue: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.requeue = requeue


class Methods:
    """Method name -> callable (sync or async)."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}
        self._signatures: dict[str, inspect.Signature] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Register the decorated callable as ``name``."""
        if not name or not isinstance(name, str):
            raise errors.ConfigError("a method name is a non-empty string")

        def decorate(function: F) -> F:
            self.add(name, function)
            return function

        return decorate

    def add(self, name: str, function: Method) -> None:
        """Register ``function`` as ``name``."""
        if name in self._methods:
            raise errors.ConfigError(f"method {name!r} is already registered")
        self._methods[name] = function
        self._signatures[name] = inspect.signature(function)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[str]:
        return iter(self._methods)

    def get(self, name: str) -> Method | None:
        """Return the callable registered as ``name``."""
        return self._methods.get(name)

    async def call(self, name: str, params: Any) -> Any:
        """Call ``name`` with JSON-RPC ``params``; raise RemoteCallError as a remote would."""
        function = self._methods.get(name)
        if function is None:
            raise errors.RemoteCallError(
                f"method {name!r} not found", code=protocol.METHOD_NOT_FOUND, retryable=False
            )
        signature = self._signatures[name]
        try:
            if params is None:
                bound = signature.bind()
            elif isinstance(params, dict):
                bound = signature.bind(**params)
            elif isinstance(params, list):
                bound = signature.bind(*params)
            else:
                raise TypeError("params must be an object, a list or absent")
        except TypeError as exc:
            raise errors.RemoteCallError(
                f"invalid params for {name!r}: {exc}",
                code=protocol.INVALID_PARAMS,
                retryable=False,
            ) from None
        try:
            result = function(*bound.args, **bound.kwargs)
            if inspect.isawaitable(result):
                result = await result
        except MethodError as exc:
            raise errors.RemoteCallError(
                exc.message, code=exc.code, data=exc.data, retryable=exc.retryable
            ) from exc
        except Reject as exc:
            raise errors.StageRejected(exc.reason, requeue=exc.requeue) from exc
        return result
