"""The registry of methods a process serves: stages call them in-process, the HTTP server too.

```python
methods = Methods()

@methods.register("orders.delete")
async def delete_orders(conditions: dict) -> dict:
    ...
```

Params are passed as keyword arguments (a JSON object), positional arguments (a list) or none.
A method raises :class:`MethodError` to answer with a JSON-RPC error of its choosing.

Who may call a method: stages always (in-process, through the executor). Over HTTP
(``/public/rpc``), a method registered with ``public=True`` is open to every valid token; one
registered with ``permission="view_others"`` (a :class:`kaiju_tasks.models.Permission` value) to
tokens holding that permission; every method to ``system`` tokens; and by default to no one else:

```python
@methods.register("orders.list", public=True)  # any valid token
@methods.register("orders.purge", permission="modify_others")  # tokens with modify_others
@methods.register("orders.delete")  # stages and system tokens only
```
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kaiju_tasks import errors, models
from kaiju_tasks.rpc import protocol

Method = Callable[..., Any]
F = TypeVar("F", bound=Method)


def _access(name: str, public: bool, permission: str | None) -> Access:
    if permission is None:
        return Access(public=bool(public))
    try:
        return Access(public=bool(public), permission=models.Permission(permission))
    except ValueError:
        known = ", ".join(p.value for p in models.Permission)
        raise errors.ConfigError(
            f"method {name!r}: unknown permission {permission!r}; known: {known}"
        ) from None


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


@dataclasses.dataclass(frozen=True, slots=True)
class Access:
    """Who may call a method over HTTP (stages always may)."""

    public: bool = False
    """Every valid token."""
    permission: models.Permission | None = None
    """Tokens holding this permission (``system`` tokens always may)."""

    def allows(self, caller: models.Caller) -> bool:
        """Whether ``caller`` (an HTTP caller) may call the method."""
        return (
            self.public
            or caller.is_system
            or (self.permission is not None and self.permission in caller.permissions)
        )

    def describe(self) -> str:
        """``public``, ``permission view_others``, or ``system``: who may call it over HTTP."""
        if self.public:
            return "public"
        if self.permission is not None and self.permission is not models.Permission.SYSTEM:
            return f"permission {self.permission.value}"
        return "system"


class Methods:
    """Method name -> callable (sync or async), and who may call it over HTTP."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}
        self._signatures: dict[str, inspect.Signature] = {}
        self._access: dict[str, Access] = {}

    def register(
        self, name: str, *, public: bool = False, permission: str | None = None
    ) -> Callable[[F], F]:
        """Register the decorated callable as ``name``.

        Args:
            name: the JSON-RPC method name.
            public: callable over HTTP by every valid token.
            permission: callable over HTTP by tokens holding this permission
                (``view_others``, ``modify_others`` or ``system``).
        """
        if not name or not isinstance(name, str):
            raise errors.ConfigError("a method name is a non-empty string")
        access = _access(name, public, permission)

        def decorate(function: F) -> F:
            self.add(name, function, access=access)
            return function

        return decorate

    def add(
        self,
        name: str,
        function: Method,
        *,
        public: bool = False,
        permission: str | None = None,
        access: Access | None = None,
    ) -> None:
        """Register ``function`` as ``name`` (``access`` replaces ``public``/``permission``)."""
        if name in self._methods:
            raise errors.ConfigError(f"method {name!r} is already registered")
        self._access[name] = access if access is not None else _access(name, public, permission)
        self._methods[name] = function
        self._signatures[name] = inspect.signature(function)

    def access(self, name: str) -> Access:
        """Who may call ``name`` over HTTP (nobody but system tokens if it is unknown)."""
        return self._access.get(name, Access())

    def set_access(self, name: str, *, public: bool = False, permission: str | None = None) -> None:
        """Change who may call the registered method ``name`` over HTTP."""
        if name not in self._methods:
            raise errors.ConfigError(f"method {name!r} is not registered")
        self._access[name] = _access(name, public, permission)

    def allowed(self, name: str, caller: models.Caller) -> bool:
        """Whether ``caller`` may call ``name`` over HTTP."""
        return name in self._methods and self.access(name).allows(caller)

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
