"""Stage kinds: for each kind, how a stage validates, what the executor does with it, how it shows.

A task's ``commands`` hold stages of the kinds in :data:`KINDS`, told apart by their ``kind``
field (``"call"`` when a dict has none). Each kind is one :class:`StageKind` entry:

- **validates**: its pydantic model (``kind`` is the union's tag), the fields that may hold
  templates (checked at create for reads of later stages' results) and, for a kind that waits a
  known time, that time (counted against the task's ``max_exec_timeout``);
- **runs or parks**: a kind with no ``park`` calls a method in one of the executor's slots; a
  kind with ``park`` takes no slot: the task waits (WAITING) until the moment ``park`` computes
  from the stored command, the task row and now;
- **renders**: its dashboard label, whether that label is code (a method name), the fields shown
  as written and as evaluated, and whether the task page offers the message action while the
  task waits on it.

Adding a kind is one model and one entry here, plus the SQL that ends its wait when it parks:
in ``store/queries.sql``, ``release_timers`` resumes ``timer`` stages, and ``write_message`` and
``expire_timeouts`` end ``message`` stages. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal, TypeAlias, Union

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
)

from kaiju_tasks import conditions, errors, templates, validation

JSONValue: TypeAlias = validation.JSONValue

# -- validation helpers shared by the command models ------------------------------------------


def _condition_spec(value: Any) -> Any:
    if isinstance(value, conditions.Condition):
        return value.spec
    if value is not None:
        try:
            conditions.validate(value, field="condition")
        except errors.ValidationError as exc:
            raise ValueError(_located(exc, "condition")) from None
    return value


def _located(exc: errors.ValidationError, top: str) -> str:
    """Return the message of ``exc``, saying where below ``top`` the problem is."""
    if exc.field and exc.field != top:
        return f"{exc.message} (at {exc.field})"
    return exc.message


def _check_template(value: JSONValue, field: str) -> None:
    if value is None or (type(value) is str and value[:1] != "["):
        return  # no template here (most methods and many params): skip the walk
    try:
        templates.validate(value, field=field)
    except errors.ValidationError as exc:
        raise ValueError(_located(exc, field)) from None


ConditionSpec = Annotated[JSONValue, BeforeValidator(_condition_spec)]
_Timeout = Annotated[int | float, Field(gt=0, le=validation.Limit.MAX_T)]  # int stays int


# -- the command models -------------------------------------------------------------------------


class StageCommand(validation.Model):
    """What every stage has: its kind (the union tag) and an optional condition."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    if TYPE_CHECKING:
        kind: str  # each kind's model declares it, as its Literal tag

    condition: ConditionSpec = Field(
        None, description="Run the stage only if this condition holds; else its result is None."
    )

    def to_json(self) -> dict[str, JSONValue]:
        """Return the command as stored in the ``commands`` column."""
        # Fields hold JSON values already, and pydantic keeps exactly the fields, in declaration
        # order, in the instance dict (extra="forbid"): a copy is much faster than model_dump.
        return dict(self.__dict__)


class TaskCommand(StageCommand):
    """A stage that makes one JSON-RPC call; ``method`` and ``params`` may hold templates."""

    kind: Literal["call"] = "call"
    method: str = Field(min_length=1, max_length=512)
    params: JSONValue = None
    max_timeout: _Timeout | None = Field(
        None, description="Seconds this stage may take; never extends the task deadline."
    )

    @field_validator("method")
    @classmethod
    def _method_template(cls, value: str) -> str:
        _check_template(value, "method")
        return value

    @field_validator("params")
    @classmethod
    def _params_templates(cls, value: JSONValue) -> JSONValue:
        _check_template(value, "params")
        return value


class Timer(StageCommand):
    """A stage that sleeps durably: the task waits ``seconds`` with no executor busy."""

    kind: Literal["timer"] = "timer"
    seconds: _Timeout

    def __init__(self, seconds: float | None = None, /, **data: Any) -> None:
        if seconds is not None:
            data["seconds"] = seconds
        super().__init__(**data)

    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]  # see validation.Model


class Message(StageCommand):
    """A stage that waits for ``write_message``; the message data becomes its result."""

    kind: Literal["message"] = "message"
    max_timeout: _Timeout | None = Field(
        None, description="Seconds to wait for the message; None waits until the task deadline."
    )


# -- deadlines (what a stage's call or wait may last) ----------------------------------------


def task_deadline(row: Mapping[str, Any], now: datetime) -> datetime:
    """When the task's run must end (``exec_deadline``)."""
    deadline: datetime | None = row["exec_deadline"]
    if deadline is None:  # rows written by hand may lack it
        return now + timedelta(seconds=row["max_exec_timeout"])
    return deadline


def stage_deadline(
    row: Mapping[str, Any], command: Mapping[str, Any], now: datetime
) -> tuple[datetime, str]:
    """When a stage must end, and which limit that is (for the error that names it).

    The task's deadline, or its own ``max_timeout`` when that comes sooner.
    """
    deadline = task_deadline(row, now)
    stage_limit = command.get("max_timeout")
    if stage_limit is not None and now + timedelta(seconds=stage_limit) < deadline:
        return now + timedelta(seconds=stage_limit), f"stage max_timeout ({stage_limit:g} s)"
    return deadline, f"task deadline (max_exec_timeout {row['max_exec_timeout']} s)"


# -- the registry -----------------------------------------------------------------------------

Park: TypeAlias = Callable[[Mapping[str, Any], Mapping[str, Any], datetime], datetime]
"""``(task row, stored command, now) -> until``: when the wait of a parking stage ends."""


@dataclasses.dataclass(frozen=True, slots=True)
class StageKind:
    """One kind of stage; see the module docstring for what each part is used for."""

    model: type[StageCommand]
    """Validates a command of this kind; its ``kind`` field's default is the kind's name."""
    label: Callable[[Mapping[str, Any]], str]
    """The dashboard's name for a stored command of this kind (a missing field raises)."""
    park: Park | None = None
    """None: the stage calls its ``method`` in a slot. Else the task waits, taking no slot,
    until the moment this returns; the manager's SQL ends the wait."""
    templated: tuple[str, ...] = ()
    """Fields that may hold templates, in the order they are rendered."""
    shown: tuple[str, ...] = ()
    """Fields the dashboard shows as written and, once reached, as evaluated."""
    label_is_code: bool = False
    """Whether the label is code (a method name), shown in monospace."""
    waits: Callable[[Any], float] | None = None
    """Seconds a task surely waits at a stage of this kind (given its validated model)."""
    takes_message: bool = False
    """Whether a task waiting at such a stage takes ``write_message`` (the dashboard action)."""

    @property
    def name(self) -> str:
        """The ``kind`` value stored in commands."""
        return str(self.model.model_fields["kind"].default)


def _message_label(command: Mapping[str, Any]) -> str:
    wait = command["max_timeout"]
    return f"message, waits up to {wait} s" if wait else "message"


CALL: Final = StageKind(
    model=TaskCommand,
    label=lambda command: str(command["method"]),
    templated=("method", "params"),
    shown=("params",),
    label_is_code=True,
)
TIMER: Final = StageKind(
    model=Timer,
    label=lambda command: f"timer, {command['seconds']} s",
    park=lambda row, command, now: now + timedelta(seconds=command["seconds"]),
    waits=lambda command: command.seconds,
)
MESSAGE: Final = StageKind(
    model=Message,
    label=_message_label,
    park=lambda row, command, now: stage_deadline(row, command, now)[0],
    takes_message=True,
)

KINDS: Final[Mapping[str, StageKind]] = {kind.name: kind for kind in (CALL, TIMER, MESSAGE)}
"""Every stage kind by name: the one list to extend with a new kind."""

PARKING_KINDS: Final = frozenset(name for name, kind in KINDS.items() if kind.park is not None)
"""Kinds that park the task (WAITING) instead of calling a method: they take no slot."""


def find(name: object) -> StageKind | None:
    """The kind named ``name`` (a stored command's ``kind``), or None when there is none."""
    return KINDS.get(name) if isinstance(name, str) else None


def of_stored(command: Mapping[str, Any]) -> StageKind:
    """The kind the executor runs a stored command as.

    A command without a ``kind`` is a call, and so is one of a kind the registry does not know
    (validation refuses those; a row written by hand may hold one): it fails as a call would.
    """
    kind: Any = command.get("kind")
    return KINDS.get(kind, CALL)


def kind_of(command: object) -> StageKind | None:
    """The kind of a stored command as shown: a mapping's ``kind``, ``call`` when it has none."""
    if not isinstance(command, Mapping):
        return None
    return find(command.get("kind") or CALL.name)


def label(command: object) -> str:
    """What the dashboard calls a stored stage: its kind's label, or what makes it none."""
    if not isinstance(command, Mapping):
        return f"not a stage ({type(command).__name__})"
    kind = kind_of(command)
    if kind is None:
        return f"unknown stage kind {str(command.get('kind'))[:64]!r}"
    return kind.label(command)


# -- the tagged union of commands ---------------------------------------------------------------

LEGACY_METHODS: Final = {"_TIMER_": "timer", "_MESSAGE_": "message"}
"""How the original kaiju-tasks wrote Timer and Message stages: ``{"method": "_TIMER_",
"params": {"timer": n}}`` and ``{"method": "_MESSAGE_"}``; accepted as those stages."""

TAGS: Final = frozenset([*KINDS, *(f"legacy_{name}" for name in LEGACY_METHODS.values())])
"""The union's tags: pydantic puts one after a command's index in an error's location."""


def _command_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("kind")
        if kind is None:
            legacy = LEGACY_METHODS.get(value.get("method"))  # type: ignore[arg-type]
            return "call" if legacy is None else f"legacy_{legacy}"
        return kind if isinstance(kind, str) else None
    return getattr(value, "kind", None)


def _from_legacy(value: Any) -> Any:
    """Rewrite an original-format Timer or Message stage into this format's fields."""
    if not isinstance(value, dict):
        return value
    rest = {k: v for k, v in value.items() if k not in ("method", "params")}
    params = value.get("params")
    if value.get("method") == "_TIMER_":
        if not isinstance(params, dict) or "timer" not in params:
            raise ValueError("a _TIMER_ stage needs params {'timer': seconds}")
        return {"kind": "timer", "seconds": params["timer"], **rest}
    if params not in (None, {}, []):
        raise ValueError("a _MESSAGE_ stage takes no params")
    return {"kind": "message", **rest}


def _union() -> Any:
    kinds = [Annotated[kind.model, Tag(name)] for name, kind in KINDS.items()]
    legacy = [
        Annotated[KINDS[name].model, BeforeValidator(_from_legacy), Tag(f"legacy_{name}")]
        for name in LEGACY_METHODS.values()
    ]
    names = ", ".join(kind.model.__name__ for kind in KINDS.values())
    return Annotated[
        Union[tuple(kinds + legacy)],  # noqa: UP007 - built from the registry at import
        Discriminator(
            _command_kind,
            custom_error_type="invalid_command",
            custom_error_message=f"a command is a {names} or a dict with 'method'",
        ),
    ]


if TYPE_CHECKING:
    Command: TypeAlias = StageCommand
else:
    Command = _union()
"""A stage: a model of one of :data:`KINDS`, or a dict (``kind`` 'call' by default)."""
