r"""Conditions: evaluates stage conditions against the task data (pure).

A stage with a condition runs only when the condition holds for the task data (the same data
templates see: ``{'id', 'kws', 'executor', '0', '1', ...}``); otherwise it is skipped.

Syntax (a condition is JSON)
    - An object is AND over its keys: ``{'0.count': {'gt': 0}, 'kws.mode': 'full'}``; ``{}`` is
      true.
    - A list is OR over its items (objects or lists): ``[{'kws.mode': 'a'}, {'kws.mode': 'b'}]``;
      ``[]`` is false.
    - A key is a data path with the template path rules (``'0.count'``, ``'0.data.id'`` maps
      over a list); a missing path compares as ``None``. The key ``'not'`` is reserved: its value
      is a sub-condition (object or list) that must *not* hold: ``{'not': {'kws.dry_run': true}}``.
    - A value is what the path is tested against:

      - a scalar (string, number, boolean, null) means ``eq``;
      - a list means ``in`` (the data value is one of the items);
      - an object ``{op: operand, ...}`` applies every operator (AND); to compare with an object,
        write ``{'eq': {...}}``.

Operators
    ``eq``/``ne``: JSON equality (``1 == 1.0``, but ``true`` is not ``1``).
    ``gt``/``lt``/``ge``/``le``: ordering between two numbers or two strings; any other pair
    (``None`` included) is false, never an error.
    ``has``: the data value contains the operand (an item of a list, a substring of a string, a
    key of an object). ``in``: the operand (a list, string or object) contains the data value.
    ``match``: a search for a regular expression anywhere in a string value, in RE2 syntax (the
    syntax of Python's ``re`` without backreferences and lookaround assertions; ``\A``, ``\z``,
    ``(?i)``, classes, repetitions and groups all work). RE2 matches in time linear in the text
    whatever the pattern, so no pattern can stall the service. The pattern is compiled when the
    condition is validated and may be at most ``[limits] pattern_chars`` characters, and take
    at most ``[limits] regex_memory`` bytes once compiled.
    ``like``: SQL ``LIKE`` on a string value, case-sensitive, over the whole string: ``%`` is any
    run of characters, ``_`` one character, ``\`` escapes the next character. It is translated
    to an RE2 expression, so it matches in linear time too.
    ``not``: its operand is a value (scalar, list or operator object) that must *not* match:
    ``{'0.status': {'not': {'in': ['a', 'b']}}}``.

Templates
    Operands may be templates, rendered against the same data right before the comparison:
    ``{'1.count': {'gt': '[0.cache.update_threshold]'}}``. A string operand that starts with
    ``[`` and ends with ``]`` is therefore a template, so a regular expression such as ``[a-z]+``
    must be backtick-quoted: ``{'match': '`[a-z]+`'}``.

Bounds
    A condition may nest at most ``[limits] condition_depth`` levels, and one evaluation may do
    at most ``[limits] eval_steps`` steps of work (values compared, characters matched), its
    operands' templates included.

A malformed condition raises ``errors.ValidationError`` naming the field (``condition.0.count.gt``)
when it is built; a template that fails at evaluation time raises it from ``evaluate``.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

import re2

from kaiju_tasks import errors, limits, templates, values

OPERATORS: Final = ("eq", "ne", "gt", "lt", "ge", "le", "has", "in", "match", "like", "not")
"""The operators an operator object may use."""

MAX_PATTERN_LENGTH: Final = limits.DEFAULT.pattern_chars
"""Longest ``match`` or ``like`` pattern accepted by default (characters; ``[limits]
pattern_chars``)."""

MAX_DEPTH: Final = limits.DEFAULT.condition_depth
"""Deepest nesting of conditions and ``not`` operators accepted by default (levels; ``[limits]
condition_depth``)."""

_ORDERINGS: Final = {
    "gt": lambda order: order > 0,
    "lt": lambda order: order < 0,
    "ge": lambda order: order >= 0,
    "le": lambda order: order <= 0,
}


class Condition:
    """A validated stage condition.

    Args:
        spec: the condition as JSON (see the module docstring), or another ``Condition``.
        field: the name reported in validation errors.

    Raises:
        errors.ValidationError: the condition is malformed.
    """

    __slots__ = ("spec",)

    def __init__(self, spec: values.JSONLike | Condition, *, field: str = "condition") -> None:
        if isinstance(spec, Condition):
            spec = spec.spec
        validate(spec, field)
        # A private copy: the spec was validated, later changes to the caller's object must not
        # slip past validation.
        self.spec: values.JSONLike = copy.deepcopy(spec)

    def evaluate(self, data: Mapping[str, Any], *, now: datetime | None = None) -> bool:
        """Whether the condition holds for ``data`` (``now`` is passed to templates)."""
        return _evaluate_bounded(self.spec, data, now)

    def to_json(self) -> values.JSONLike:
        """Return the condition as JSON."""
        return self.spec

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Condition):
            return NotImplemented
        return values.json_equal(self.spec, other.spec)

    def __repr__(self) -> str:
        return f"Condition({self.spec!r})"


def validate(spec: Any, field: str = "condition") -> None:
    """Check a condition.

    Args:
        spec: the condition as JSON.
        field: the name of the condition, used to build the dotted path reported in errors.

    Raises:
        errors.ValidationError: unknown operator, wrong operand type, malformed template or bad
            pattern; ``field`` is the dotted path to the offending value.
    """
    _validate(spec, field, 0)


def evaluate(
    spec: values.JSONLike | Condition,
    data: Mapping[str, Any],
    *,
    now: datetime | None = None,
    budget: values.Budget | None = None,
) -> bool:
    """Validate a condition and evaluate it against ``data``.

    Args:
        spec: the condition as JSON, or a ``Condition``.
        data: the task data.
        now: the current time, passed to templates in operands.
        budget: the work allowance to draw from (a fresh ``eval_steps`` one by default).

    Returns:
        Whether the condition holds.

    Raises:
        errors.ValidationError: the condition is malformed, or a template in it failed.
    """
    if isinstance(spec, Condition):
        spec = spec.spec
    else:
        validate(spec)
    return _evaluate_bounded(spec, data, now, budget)


# --- validation ---------------------------------------------------------------------------------


def _check_depth(depth: int, field: str) -> None:
    bound = limits.active().condition_depth
    if depth > bound:
        raise errors.ValidationError(
            f"nested deeper than condition_depth ({bound} levels)", field=field
        )


def _validate(spec: Any, field: str, depth: int) -> None:
    _check_depth(depth, field)
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            if not isinstance(key, str):
                raise errors.ValidationError(
                    f"condition keys must be strings, got {values.shown(repr(key))}", field=field
                )
            where = f"{field}.{key}"
            if key == "not":
                _validate(value, where, depth + 1)
            else:
                _check_path(key, where)
                _validate_value(value, where, depth + 1)
    elif isinstance(spec, list | tuple):
        for index, item in enumerate(spec):
            _validate(item, f"{field}.{index}", depth + 1)
    else:
        raise errors.ValidationError(
            f"a condition must be an object (AND) or a list (OR), got {values.type_name(spec)}",
            field=field,
        )


def _check_path(key: str, field: str) -> None:
    if templates.is_template(key) or templates.is_literal(key):
        raise errors.ValidationError(
            f"condition key {values.shown(key)} must be a data path like '0.count', not a template",
            field=field,
        )
    if "" in key.split("."):
        raise errors.ValidationError(
            f"condition key {values.shown(key)} is not a data path: it has an empty key",
            field=field,
        )


def _validate_value(value: Any, field: str, depth: int) -> None:
    _check_depth(depth, field)
    if isinstance(value, Mapping):
        if not value:
            raise errors.ValidationError(
                "empty operator object; to compare with an empty object write {'eq': {}}",
                field=field,
            )
        for op, operand in value.items():
            where = f"{field}.{op}"
            if op not in OPERATORS:
                raise errors.ValidationError(
                    f"unknown operator {values.shown(str(op))}"
                    f" (expected one of: {', '.join(OPERATORS)})",
                    field=where,
                )
            if op == "not":
                _validate_value(operand, where, depth + 1)
            else:
                _validate_operand(op, operand, where)
    elif isinstance(value, list | tuple):
        _validate_operand("in", value, field)
    else:
        _validate_operand("eq", value, field)


def _validate_operand(op: str, operand: Any, field: str) -> None:
    templates.validate(operand, field)
    if templates.is_template(operand):
        return  # its type is only known once rendered; checked in _apply
    try:
        _check_operand(op, _literal(operand))
    except errors.ValidationError as exc:
        raise errors.ValidationError(exc.message, field=field) from exc


def _literal(operand: Any) -> Any:
    """The value a non-template operand renders to (backtick quotes stripped)."""
    return operand[1:-1] if templates.is_literal(operand) else operand


def _check_operand(op: str, operand: Any) -> None:
    """Raise if ``operand`` (already rendered) cannot be used with ``op``."""
    if op in _ORDERINGS:
        if isinstance(operand, bool) or not isinstance(operand, int | float | str):
            raise errors.ValidationError(
                f"{op!r} needs a number or a string, got {values.type_name(operand)}"
            )
    elif op == "in":
        if not isinstance(operand, list | tuple | str | Mapping):
            raise errors.ValidationError(
                f"'in' needs a list, a string or an object, got {values.type_name(operand)}"
            )
    elif op in ("match", "like"):
        if not isinstance(operand, str):
            raise errors.ValidationError(
                f"{op!r} needs a string pattern, got {values.type_name(operand)}"
            )
        if op == "match":
            _regex(operand)
        else:
            _like(operand)


# --- evaluation ---------------------------------------------------------------------------------


class _Run:
    """One evaluation: the data, the time and the work it may still do."""

    __slots__ = ("budget", "data", "now")

    def __init__(
        self, data: Mapping[str, Any], now: datetime | None, budget: values.Budget | None
    ) -> None:
        self.data = data
        self.now = now
        self.budget = budget or values.Budget()


def _evaluate_bounded(
    spec: Any,
    data: Mapping[str, Any],
    now: datetime | None,
    budget: values.Budget | None = None,
) -> bool:
    try:
        return _evaluate(spec, _Run(data, now, budget), "condition")
    except RecursionError:
        raise errors.ValidationError("nested too deeply to evaluate", field="condition") from None


def _evaluate(spec: Any, run: _Run, where: values.Where) -> bool:
    # ``where`` names the part being evaluated, spelled out only for an error.
    run.budget.charge(1)
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            if key == "not":
                if _evaluate(value, run, (where, key)):
                    return False
            else:
                actual = templates.get_path(run.data, key, None, run.budget)
                if not _test(actual, value, run, (where, key)):
                    return False
        return True
    return any(_evaluate(item, run, (where, i)) for i, item in enumerate(spec))


def _test(actual: Any, value: Any, run: _Run, where: values.Where) -> bool:
    if isinstance(value, Mapping):
        return all(_apply(op, actual, operand, run, (where, op)) for op, operand in value.items())
    if isinstance(value, list | tuple):
        return _apply("in", actual, value, run, where)
    return _apply("eq", actual, value, run, where)


def _apply(op: str, actual: Any, operand: Any, run: _Run, where: values.Where) -> bool:
    budget = run.budget
    budget.charge(1)
    if op == "not":
        return not _test(actual, operand, run, where)
    expected: Any = templates.render(operand, run.data, now=run.now, field=where, budget=budget)
    if op == "eq":
        return values.json_equal(actual, expected, budget)
    if op == "ne":
        return not values.json_equal(actual, expected, budget)
    if op == "has":
        return _contains(actual, expected, budget)
    try:
        _check_operand(op, expected)
    except errors.ValidationError as exc:
        shown = values.shown(operand) if isinstance(operand, str) else "the operand"
        raise errors.ValidationError(
            f"{exc.message} (from {shown})", field=values.field_name(where)
        ) from exc
    if op == "in":
        return _contains(expected, actual, budget)
    if op in _ORDERINGS:
        if isinstance(actual, str):
            budget.chars(len(actual))
        order = values.compare(actual, expected)
        return order is not None and _ORDERINGS[op](order)
    if not isinstance(actual, str):
        return False
    budget.chars(len(actual) * _MATCH_COST)
    if op == "match":
        return _regex(expected).search(actual) is not None
    return _like(expected).search(actual) is not None


_MATCH_COST: Final = 25  # a character matched costs as much as this many copied or compared


def _contains(container: Any, item: Any, budget: values.Budget) -> bool:
    if isinstance(container, list | tuple):
        budget.charge(len(container))
        return any(values.json_equal(element, item, budget) for element in container)
    if isinstance(container, str | Mapping):
        if isinstance(container, str):
            budget.chars(len(container))
        return isinstance(item, str) and item in container
    return False


# --- patterns -----------------------------------------------------------------------------------


def _check_length(pattern: str) -> None:
    bound = limits.active().pattern_chars
    if len(pattern) > bound:
        raise errors.ValidationError(
            f"pattern is {len(pattern)} characters, more than pattern_chars ({bound})"
        )


def _options() -> re2.Options:
    options = re2.Options()
    options.max_mem = limits.active().regex_memory
    options.never_capture = True  # only whether it matches is needed: the fastest engine
    options.log_errors = False  # the error is raised to the caller instead
    return options


def _compile(pattern: str, source: str, what: str) -> Any:
    _check_length(source)
    try:
        return re2.compile(pattern, _options())
    except (re2.error, TypeError, ValueError) as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        raise errors.ValidationError(f"invalid {what} {values.shown(source)}: {reason}") from None


def _regex(pattern: str) -> Any:
    """The compiled RE2 expression of a ``match`` pattern."""
    return _regex_cached(pattern, limits.active())


def _like(pattern: str) -> Any:
    """The RE2 expression of a ``LIKE`` pattern, anchored at both ends."""
    return _like_cached(pattern, limits.active())


# At most 64 compiled patterns of each kind are kept: each holds up to regex_memory bytes.
@functools.lru_cache(maxsize=64)
def _regex_cached(pattern: str, bounds: limits.Limits) -> Any:
    return _compile(pattern, pattern, "regular expression")


@functools.lru_cache(maxsize=64)
def _like_cached(pattern: str, bounds: limits.Limits) -> Any:
    out = ["(?s)\\A"]
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 == len(pattern):
                raise errors.ValidationError(
                    f"LIKE pattern {values.shown(pattern)} ends with the escape character '\\'"
                )
            out.append(re2.escape(pattern[i + 1]))
            i += 2
            continue
        out.append(".*" if char == "%" else "." if char == "_" else re2.escape(char))
        i += 1
    out.append("\\z")
    return _compile("".join(out), pattern, "LIKE pattern")
