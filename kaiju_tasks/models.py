"""Task, TaskCommand, Timer, Message, the status enums and Limit.

The stage models (TaskCommand, Timer, Message) are defined with their kinds in
:mod:`kaiju_tasks.stages` and ``Limit`` in :mod:`kaiju_tasks.validation`; both are importable here.
Pydantic v2 models that validate at the boundary and do no I/O. A validation failure is raised as
:class:`kaiju_tasks.errors.ValidationError` naming the offending field (dotted path, e.g.
``commands.1.max_timeout``) and the rule it broke.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Final, TypeAlias

import pydantic
from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from kaiju_tasks import cron, errors, stages, templates, validation

JSONValue: TypeAlias = validation.JSONValue
"""Any JSON value: dict, list, str, int, float, bool or None (recursively)."""


class TaskStatus(enum.StrEnum):
    """Task statuses (the ``status`` column)."""

    IDLE = "IDLE"
    """Created or between cron runs; the manager queues it when ``next_run`` is due."""
    QUEUED = "QUEUED"
    """Waiting for an executor to claim it."""
    EXECUTED = "EXECUTED"
    """An executor runs its current stage."""
    FINISHED = "FINISHED"
    """Every stage succeeded."""
    FAILED = "FAILED"
    """A stage failed, timed out or the task was cancelled, and no retry is left."""
    WAITING = "WAITING"
    """A Timer or a Message stage holds it; no executor is busy with it."""
    SUSPENDED = "SUSPENDED"
    """Its executor was lost or a wait ended; it is re-queued at once."""


ACTIVE_STATUSES = frozenset({TaskStatus.QUEUED, TaskStatus.EXECUTED, TaskStatus.SUSPENDED})
"""Statuses in which a task is already on its way: chaining does not restart it."""

FINAL_STATUSES = frozenset({TaskStatus.FINISHED, TaskStatus.FAILED})


class ExitCode(enum.IntEnum):
    """Task exit codes (the ``exit_code`` column; None until the task ends)."""

    SUCCESS = 0
    EXECUTION_ERROR = 1
    ABORTED = 130
    """Timed out or cancelled."""


class RestartPolicy(enum.StrEnum):
    """Where a retried task resumes."""

    CURRENT = "CURRENT"
    """Keep earlier results and resume at the failed stage."""
    FIRST = "FIRST"
    """Discard all results and start over from stage 0."""


class Priority(enum.IntEnum):
    """Named priorities; any integer from -100 to 100 is allowed, higher runs first."""

    LOW = -10
    NORMAL = 0
    HIGH = 10


Limit = validation.Limit

MAX_ID_LENGTH = 256
MAX_RETRY_DELAY = 86400  # seconds
MAX_REQUEUES = 10
"""A task rejected with ``requeue=True`` more often than this fails instead."""
MAX_PRIORITY = 100
DEFAULT_APP = "default"
DEBUG_MARK = "@debug-"
"""Marks the private queue of a debug executor: ``<app>@debug-<random>``."""


class Permission(enum.StrEnum):
    """Permissions a caller may hold besides owning its own rows."""

    VIEW_OTHERS = "view_others"
    """See tasks and notifications of other users."""
    MODIFY_OTHERS = "modify_others"
    """Change tasks and notifications of other users; takes effect with VIEW_OTHERS."""
    SYSTEM = "system"
    """Everything, including system-only fields (``user_id``, ``system``)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a service call: a user id plus permissions, or the system."""

    user_id: str | None = None
    permissions: frozenset[Permission] = frozenset()

    @property
    def is_system(self) -> bool:
        """Whether the caller may see and change everything."""
        return Permission.SYSTEM in self.permissions

    @property
    def views_all(self) -> bool:
        """Whether the caller sees rows of other users."""
        return self.is_system or Permission.VIEW_OTHERS in self.permissions

    @property
    def modifies_all(self) -> bool:
        """Whether the caller may change rows of other users."""
        return self.is_system or Permission.MODIFY_OTHERS in self.permissions

    @classmethod
    def user(cls, user_id: str, permissions: Iterable[str] = ()) -> Caller:
        """Build a user caller; ``permissions`` are :class:`Permission` values."""
        found = []
        for p in permissions:
            try:
                found.append(Permission(p))
            except ValueError:
                known = ", ".join(m.value for m in Permission)
                raise errors.ValidationError(
                    f"unknown permission {p!r}; known: {known}", field="permissions"
                ) from None
        return cls(user_id=user_id, permissions=frozenset(found))


SYSTEM = Caller(user_id=None, permissions=frozenset({Permission.SYSTEM}))
"""The caller of in-process service calls unless another is given."""


# -- commands ---------------------------------------------------------------------------------

# The stage kinds and their models live in kaiju_tasks.stages, one entry per kind.
StageCommand = stages.StageCommand
TaskCommand = stages.TaskCommand
Timer = stages.Timer
Message = stages.Message
Command = stages.Command
LEGACY_METHODS: Final = stages.LEGACY_METHODS

_Model = validation.Model


# -- tasks ------------------------------------------------------------------------------------


def _priority(value: Any) -> Any:
    if isinstance(value, str) and value.upper() in Priority.__members__:
        return Priority[value.upper()].value
    return value


PriorityValue = Annotated[int, BeforeValidator(_priority), Field(ge=-MAX_PRIORITY, le=MAX_PRIORITY)]


class _TaskFields(_Model):
    """Fields shared by :class:`Task` and :class:`TaskUpdate`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @field_validator("cron", check_fields=False)
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return cron.validate(value)
        except errors.ValidationError as exc:
            raise ValueError(exc.message) from None


class Task(_TaskFields):
    """A task: an ordered list of stages plus how to run, retry, schedule and chain it.

    ``app`` and ``app_name`` are both accepted. Fields the engine owns (status, results and
    timestamps) are not part of this model; services return them as plain dicts.
    """

    id: str | None = Field(
        None, min_length=1, max_length=MAX_ID_LENGTH, description="Given or generated (uuid4)."
    )
    app_name: str = Field(
        DEFAULT_APP,
        min_length=1,
        max_length=256,
        validation_alias=AliasChoices("app_name", "app"),
        description="Which executors run it.",
    )
    commands: list[Command] = Field(min_length=1, max_length=Limit.MAX_STAGES)
    kws: dict[str, JSONValue] = Field(default_factory=dict)
    enabled: bool = True
    cron: str | None = None
    max_exec_timeout: int = Field(Limit.DEFAULT_T, ge=Limit.MIN_T, le=Limit.MAX_T)
    max_retries: int = Field(0, ge=0, le=Limit.MAX_RETRIES)
    restart_policy: RestartPolicy = RestartPolicy.CURRENT
    retry_delay: int = Field(
        0,
        ge=0,
        le=MAX_RETRY_DELAY,
        description="Seconds before the first retry, doubled each time.",
    )
    next_task: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH)
    notify: bool = False
    system: bool = False
    description: str | None = Field(None, max_length=10000)
    meta: dict[str, JSONValue] = Field(default_factory=dict)
    priority: PriorityValue = Priority.NORMAL
    expires_at: datetime | None = None
    user_id: str | None = Field(None, max_length=256)
    parent_id: str | None = Field(None, max_length=MAX_ID_LENGTH)
    root_id: str | None = Field(None, max_length=MAX_ID_LENGTH)

    def __init__(self, /, **data: Any) -> None:
        # Declared so that type checkers accept ``app=`` beside ``app_name=``.
        super().__init__(**data)

    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    @model_validator(mode="after")
    def _consistent(self) -> Task:
        _check_consistency(self.commands, self.max_exec_timeout, self.id, self.next_task)
        if self.expires_at is not None and self.expires_at.tzinfo is None:
            raise ValueError("expires_at: must include a timezone")
        return self


class TaskUpdate(_TaskFields):
    """The fields a user may change with ``update``; every field is optional."""

    app_name: str | None = Field(
        None, min_length=1, max_length=256, validation_alias=AliasChoices("app_name", "app")
    )
    commands: list[Command] | None = Field(None, min_length=1, max_length=Limit.MAX_STAGES)
    kws: dict[str, JSONValue] | None = None
    enabled: bool | None = None
    cron: str | None = None
    max_exec_timeout: int | None = Field(None, ge=Limit.MIN_T, le=Limit.MAX_T)
    max_retries: int | None = Field(None, ge=0, le=Limit.MAX_RETRIES)
    restart_policy: RestartPolicy | None = None
    retry_delay: int | None = Field(None, ge=0, le=MAX_RETRY_DELAY)
    next_task: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH)
    notify: bool | None = None
    system: bool | None = None
    description: str | None = Field(None, max_length=10000)
    meta: dict[str, JSONValue] | None = None
    priority: PriorityValue | None = None
    expires_at: datetime | None = None
    user_id: str | None = Field(None, max_length=256)


NULLABLE = frozenset({"cron", "next_task", "description", "expires_at", "user_id"})
"""Fields an update may set to null (the others always hold a value)."""

SYSTEM_ONLY_FIELDS = frozenset({"system", "user_id", "parent_id", "root_id"})
"""Fields only a system caller may set."""


def _check_consistency(
    commands: list[StageCommand],
    max_exec_timeout: int,
    task_id: str | None,
    next_task: str | None,
) -> None:
    # ``kind``, not isinstance: pydantic's metaclass makes isinstance slow, and bulk creates
    # check every command of every task.
    kinds = stages.KINDS
    waited: float = 0
    for command in commands:
        waits = kinds[command.kind].waits
        if waits is not None:
            waited += waits(command)
    if waited > max_exec_timeout:
        raise ValueError(
            f"max_exec_timeout: timers total {waited:g} s, more than the task's "
            f"max_exec_timeout of {max_exec_timeout} s, so the task could never finish"
        )
    if task_id is not None and next_task == task_id:
        raise ValueError("next_task: a task cannot chain to itself")
    for index, command in enumerate(commands):
        templated = kinds[command.kind].templated
        if templated:
            _check_stage_references(index, command, templated)


def _check_stage_references(index: int, command: StageCommand, fields: Sequence[str]) -> None:
    """Refuse a template that reads the result of its own stage or of a later one."""
    for field in fields:
        value = getattr(command, field)
        if value is None or (type(value) is str and value[:1] != "[") or not _may_hold(value):
            continue  # no template here: skip the walk (most commands of a bulk create)
        for stage, template in templates.stage_references(value):
            if stage >= index:
                raise ValueError(
                    f"commands.{index}.{field}: template {templates.shown(template)} reads the"
                    f" result of stage {stage}, which has not run when stage {index} starts"
                )


def _may_hold(value: JSONValue) -> bool:
    """Whether ``value`` may hold a template (a string starting with '[' somewhere in it)."""
    if type(value) is str:
        return value[:1] == "["
    if type(value) is dict:
        return any(_may_hold(v) for v in value.values())
    if type(value) is list:
        return any(_may_hold(v) for v in value)
    return False


def check_merged(current: Mapping[str, Any], changes: Mapping[str, Any]) -> None:
    """Check that a task still holds together once ``changes`` apply to its row ``current``."""
    merged = {**current, **changes}
    commands = parse_commands(merged["commands"], field="commands")
    try:
        _check_consistency(commands, merged["max_exec_timeout"], merged["id"], merged["next_task"])
    except ValueError as exc:
        field, _, message = str(exc).partition(": ")
        raise errors.ValidationError(message, field=field) from None


_COMMANDS = pydantic.TypeAdapter(list[Command])


def parse_commands(value: Any, field: str = "commands") -> list[StageCommand]:
    """Parse stored or user-given commands into models."""
    try:
        return _COMMANDS.validate_python(value)
    except pydantic.ValidationError as exc:
        raise validation_error(exc, prefix=field) from None


class NotificationUpdate(BaseModel):
    """The fields a user may change on a notification."""

    model_config = ConfigDict(extra="forbid")

    read: bool


# -- errors -----------------------------------------------------------------------------------

_TAGS = stages.TAGS


def _field_path(loc: tuple[int | str, ...], prefix: str) -> str:
    parts: list[str] = [prefix] if prefix else []
    previous: int | str | None = None
    for part in loc:
        # A tagged union adds the tag after the list index: commands.0.call.method.
        if isinstance(part, str) and isinstance(previous, int) and part in _TAGS:
            previous = part
            continue
        if isinstance(part, str) and part.startswith(("function-", "json-or-python")):
            continue
        parts.append(str(part))
        previous = part
    return ".".join(parts)


def validation_error(exc: pydantic.ValidationError, prefix: str = "") -> errors.ValidationError:
    """Translate a pydantic error into ours: one ``{field, message}`` per problem."""
    found: list[dict[str, Any]] = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        field = _field_path(tuple(err["loc"]), prefix)
        message = str(err["msg"])
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "missing":
            message = "field required"
        message = message.removeprefix("Value error, ")
        # Cross-field checks name their field first: "next_task: ...".
        head, sep, rest = message.partition(": ")
        if sep and not err["loc"] and _names_a_field(head):
            field = f"{prefix}.{head}" if prefix else head
            message = rest
        elif sep and head.isidentifier() and head in _MODEL_FIELDS:
            field = f"{field}.{head}" if field else head
            message = rest
        found.append({"field": field or None, "message": message})
    return errors.ValidationError(errors=found)


_MODEL_FIELDS = frozenset(Task.model_fields)


def _names_a_field(head: str) -> bool:
    """Whether a cross-field message starts with a field path (``commands.2.params: ...``)."""
    first, *rest = head.split(".")
    return first.isidentifier() and all(part.isidentifier() or part.isdigit() for part in rest)


def parse_task(data: Task | Mapping[str, Any], prefix: str = "") -> Task:
    """Validate ``data`` as a :class:`Task` (a Task instance is re-validated as given)."""
    if type(data) is Task or isinstance(data, Task):  # type() first: isinstance is slow here
        return data
    if not isinstance(data, Mapping):
        raise errors.ValidationError("a task is an object", field=prefix or "data")
    try:
        return Task.model_validate(data)
    except pydantic.ValidationError as exc:
        raise validation_error(exc, prefix) from None


_TASKS = pydantic.TypeAdapter(list[Task])


def parse_tasks(items: Sequence[Any], first: int | None = None) -> list[Task]:
    """Validate ``items`` as :class:`Task` objects, errors located as :func:`parse_task` says.

    ``first`` is the index of ``items[0]`` in the caller's list (errors then name the item, as
    in ``"3.commands"``); None for a single task given alone. The list is validated in one call
    into pydantic-core; when it fails, the items are validated one by one to report the first
    bad one exactly as :func:`parse_task` would.
    """
    try:
        return _TASKS.validate_python(items if type(items) is list else list(items))
    except pydantic.ValidationError:
        pass
    if first is None:
        return [parse_task(item) for item in items]
    return [parse_task(item, prefix=str(i)) for i, item in enumerate(items, first)]


def parse_update(data: TaskUpdate | Mapping[str, Any], prefix: str = "data") -> TaskUpdate:
    """Validate ``data`` as a :class:`TaskUpdate`; fields the engine owns are refused by name."""
    if isinstance(data, TaskUpdate):
        return data
    if not isinstance(data, Mapping):
        raise errors.ValidationError("changes are an object", field=prefix)
    nulls = [name for name, value in data.items() if value is None and name not in NULLABLE]
    if nulls:
        raise errors.ValidationError(
            errors=[{"field": f"{prefix}.{name}", "message": "cannot be null"} for name in nulls]
        )
    try:
        return TaskUpdate.model_validate(data)
    except pydantic.ValidationError as exc:
        error = validation_error(exc, prefix)
        for item in error.errors:
            name = str(item["field"]).removeprefix(f"{prefix}.")
            if item["message"] == "unknown field" and name in TASK_COLUMNS:
                item["message"] = "cannot be changed"
        raise errors.ValidationError(errors=error.errors) from None


TASK_COLUMNS = (
    "id",
    "app_name",
    "commands",
    "kws",
    "enabled",
    "cron",
    "max_exec_timeout",
    "max_retries",
    "retries",
    "restart_policy",
    "retry_delay",
    "next_task",
    "notify",
    "system",
    "description",
    "meta",
    "priority",
    "status",
    "stage",
    "stages",
    "result",
    "error",
    "exit_code",
    "job_id",
    "user_id",
    "executor_id",
    "created",
    "queued_at",
    "exec_deadline",
    "wait_deadline",
    "next_run",
    "status_change",
    "expires_at",
    "parent_id",
    "root_id",
    "requeues",
    "claim_id",
    "trace",
)
"""Columns of the ``tasks`` table, in order: the names are part of the contract."""

NOTIFICATION_COLUMNS = (
    "id",
    "task_id",
    "job_id",
    "status",
    "result",
    "exit_code",
    "error",
    "user_id",
    "read",
    "created",
)
"""Columns of the ``notifications`` table."""
