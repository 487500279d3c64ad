"""The KaijuTasksError hierarchy: every error the package raises on purpose."""

from __future__ import annotations

from typing import Any


class KaijuTasksError(Exception):
    """A kaiju-tasks error."""

    def __init__(self, message: str | None = None, **data: Any) -> None:
        if not message:
            message = (self.__doc__ or type(self).__name__).strip()
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = data


class ConfigError(KaijuTasksError):
    """Invalid configuration."""


class ValidationError(KaijuTasksError):
    """Invalid input.

    ``field`` names the offending field (dotted path) when it is known; ``errors`` holds one
    ``{"field", "message"}`` entry per problem when several were found at once.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        field: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        if errors is None:
            errors = [{"field": field, "message": message or "invalid value"}]
        if not message:
            message = "; ".join(
                f"{e['field']}: {e['message']}" if e.get("field") else str(e["message"])
                for e in errors
            )
        super().__init__(message)
        self.field = field if field is not None else (errors[0].get("field") if errors else None)
        self.errors = errors
        self.data = {"errors": errors}


class NotAuthorized(KaijuTasksError):
    """Not authorised."""


class TaskNotFound(KaijuTasksError):
    """Task not found."""


class NotificationNotFound(KaijuTasksError):
    """Notification not found."""


class Conflict(KaijuTasksError):
    """The object already exists."""


class InvalidTransition(KaijuTasksError):
    """The task is not in a state that allows this operation."""


class StoreError(KaijuTasksError):
    """Database failure."""


class MigrationError(StoreError):
    """Migration failure."""


class StageError(KaijuTasksError):
    """A stage failed."""

    def __init__(
        self, message: str | None = None, *, stage: int | None = None, retryable: bool = True
    ) -> None:
        super().__init__(message)
        self.stage = stage
        self.retryable = retryable


class StageRejected(StageError):
    """The stage's method rejected the task."""

    def __init__(self, message: str | None = None, *, requeue: bool = False) -> None:
        super().__init__(message, retryable=False)
        self.requeue = requeue


class StageTimeout(StageError):
    """The stage timed out."""


class RemoteCallError(StageError):
    """The stage's JSON-RPC call returned an error."""

    def __init__(
        self,
        message: str | None = None,
        *,
        code: int = -32603,
        data: Any = None,
        stage: int | None = None,
        retryable: bool = True,
    ) -> None:
        super().__init__(message, stage=stage, retryable=retryable)
        self.code = code
        self.remote_data = data


class TransportError(StageError):
    """The stage's target is unreachable."""


class RemoteError(KaijuTasksError):
    """The HTTP API answered a JSON-RPC error that no other class stands for.

    Raised by :mod:`kaiju_tasks.client`. ``code`` is the JSON-RPC error code (e.g. -32004, the
    call took longer than the server's ``request_timeout``; -32603, an internal error) and
    ``data`` the error's ``data`` member as sent (any JSON value; None when absent).
    """

    def __init__(self, message: str | None = None, *, code: int, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data


class RateLimited(RemoteError):
    """Too many failed authentications from this address (HTTP 429, JSON-RPC -32008).

    ``retry_after`` is the number of seconds the server asked to wait, when it said.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        code: int = -32008,
        data: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code, data=data)
        self.retry_after = retry_after


class Unreachable(KaijuTasksError):
    """The HTTP API did not answer: no connection, no reply in time, or a reply not JSON-RPC.

    Raised by :mod:`kaiju_tasks.client`. ``sent`` is False only when the request certainly never
    left (the connection could not be made), so sending it again cannot run it twice; when True
    the server may have run the call.
    """

    def __init__(self, message: str | None = None, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent
