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
    ``match``: ``re.search`` of a regular expression in a string value; the pattern is compiled
    when the condition is validated and may be at most ``MAX_PATTERN_LENGTH`` characters.
    ``like``: SQL ``LIKE`` on a string value, case-sensitive, over the whole string: ``%`` is any
    run of characters, ``_`` one character, ``\`` escapes the next character. It runs as a
    sequence of fixed-length regular expressions, so it cannot backtrack catastrophically.
    ``not``: its operand is a value (scalar, list or operator object) that must *not* match:
    ``{'0.status': {'not': {'in': ['a', 'b']}}}``.

Templates
    Operands may be templates, rendered against the same data right before the comparison:
    ``{'1.count': {'gt': '[0.cache.update_threshold]'}}``. A string operand that starts with
    ``[`` and ends with ``]`` is therefore a template, so a regular expression such as ``[a-z]+``
    must be backtick-quoted: ``{'match': '`[a-z]+`'}``.

A malformed condition raises ``errors.ValidationError`` naming the field (``condition.0.count.gt``)
when it is built; a template that fails at evaluation time raises it from ``evaluate``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
import warnings
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from kaiju_tasks import errors, templates

OPERATORS: Final = ("eq", "ne", "gt", "lt", "ge", "le", "has", "in", "match", "like", "not")
"""The operators an operator object may use."""

MAX_PATTERN_LENGTH: Final = 256
"""Longest ``match`` or ``like`` pattern accepted (characters); bounds the cost of matching."""

MAX_DEPTH: Final = 64
"""Deepest nesting of conditions and ``not`` operators accepted (levels)."""

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

    def __init__(self, spec: templates.JSONLike | Condition, *, field: str = "condition") -> None:
        if isinstance(spec, Condition):
            spec = spec.spec
        validate(spec, field)
        # A private copy: the spec was validated, later changes to the caller's object must not
        # slip past validation.
        self.spec: templates.JSONLike = copy.deepcopy(spec)

    def evaluate(self, data: Mapping[str, Any], *, now: datetime | None = None) -> bool:
        """Whether the condition holds for ``data`` (``now`` is passed to templates)."""
        return _evaluate(self.spec, data, now, "condition")

    def to_json(self) -> templates.JSONLike:
        """Return the condition as JSON."""
        return self.spec

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Condition):
            return NotImplemented
        return templates.json_equal(self.spec, other.spec)

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
    spec: templates.JSONLike | Condition,
    data: Mapping[str, Any],
    *,
    now: datetime | None = None,
) -> bool:
    """Validate a condition and evaluate it against ``data``.

    Args:
        spec: the condition as JSON, or a ``Condition``.
        data: the task data.
        now: the current time, passed to templates in operands.

    Returns:
        Whether the condition holds.

    Raises:
        errors.ValidationError: the condition is malformed, or a template in it failed.
    """
    if isinstance(spec, Condition):
        return spec.evaluate(data, now=now)
    validate(spec)
    return _evaluate(spec, data, now, "condition")


# --- validation ---------------------------------------------------------------------------------


def _validate(spec: Any, field: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise errors.ValidationError(f"nested deeper than {MAX_DEPTH} levels", field=field)
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            if not isinstance(key, str):
                raise errors.ValidationError(
                    f"condition keys must be strings, got {key!r}", field=field
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
            f"a condition must be an object (AND) or a list (OR), got {_type_name(spec)}",
            field=field,
        )


def _check_path(key: str, field: str) -> None:
    if templates.is_template(key) or templates.is_literal(key):
        raise errors.ValidationError(
            f"condition key {key!r} must be a data path like '0.count', not a template",
            field=field,
        )
    if "" in key.split("."):
        raise errors.ValidationError(
            f"condition key {key!r} is not a data path: it has an empty key", field=field
        )


def _validate_value(value: Any, field: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise errors.ValidationError(f"nested deeper than {MAX_DEPTH} levels", field=field)
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
                    f"unknown operator {op!r} (expected one of: {', '.join(OPERATORS)})",
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
                f"{op!r} needs a number or a string, got {_type_name(operand)}"
            )
    elif op == "in":
        if not isinstance(operand, list | tuple | str | Mapping):
            raise errors.ValidationError(
                f"'in' needs a list, a string or an object, got {_type_name(operand)}"
            )
    elif op in ("match", "like"):
        if not isinstance(operand, str):
            raise errors.ValidationError(
                f"{op!r} needs a string pattern, got {_type_name(operand)}"
            )
        if op == "match":
            _regex(operand)
        else:
            _like(operand)


# --- evaluation ---------------------------------------------------------------------------------


def _evaluate(spec: Any, data: Mapping[str, Any], now: datetime | None, field: str) -> bool:
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            where = f"{field}.{key}"
            if key == "not":
                if _evaluate(value, data, now, where):
                    return False
            elif not _test(templates.get_path(data, key, None), value, data, now, where):
                return False
        return True
    return any(_evaluate(item, data, now, f"{field}.{i}") for i, item in enumerate(spec))


def _test(
    actual: Any, value: Any, data: Mapping[str, Any], now: datetime | None, field: str
) -> bool:
    if isinstance(value, Mapping):
        return all(
            _apply(op, actual, operand, data, now, f"{field}.{op}") for op, operand in value.items()
        )
    if isinstance(value, list | tuple):
        return _apply("in", actual, value, data, now, field)
    return _apply("eq", actual, value, data, now, field)


def _apply(
    op: str, actual: Any, operand: Any, data: Mapping[str, Any], now: datetime | None, field: str
) -> bool:
    if op == "not":
        return not _test(actual, operand, data, now, field)
    expected: Any = templates.render(operand, data, now=now, field=field)
    if op == "eq":
        return templates.json_equal(actual, expected)
    if op == "ne":
        return not templates.json_equal(actual, expected)
    if op == "has":
        return _contains(actual, expected)
    try:
        _check_operand(op, expected)
    except errors.ValidationError as exc:
        raise errors.ValidationError(f"{exc.message} (from {operand!r})", field=field) from exc
    if op == "in":
        return _contains(expected, actual)
    if op in _ORDERINGS:
        order = templates.compare(actual, expected)
        return order is not None and _ORDERINGS[op](order)
    if not isinstance(actual, str):
        return False
    if op == "match":
        return _regex(expected).search(actual) is not None
    return _like(expected).fullmatch(actual)


def _contains(container: Any, item: Any) -> bool:
    if isinstance(container, list | tuple):
        return any(templates.json_equal(element, item) for element in container)
    if isinstance(container, str | Mapping):
        return isinstance(item, str) and item in container
    return False


# --- patterns -----------------------------------------------------------------------------------


def _check_length(pattern: str) -> None:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise errors.ValidationError(
            f"pattern is longer than {MAX_PATTERN_LENGTH} characters ({len(pattern)})"
        )


@functools.lru_cache(maxsize=512)
def _regex(pattern: str) -> re.Pattern[str]:
    _check_length(pattern)
    # The re module warns (FutureWarning) about patterns whose meaning will change, such as
    # "[[a]"; such a pattern is refused rather than left to mean something else later.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return re.compile(pattern)
        except (re.error, OverflowError, RecursionError, Warning) as exc:
            raise errors.ValidationError(f"invalid regular expression {pattern!r}: {exc}") from exc


@dataclasses.dataclass(frozen=True, slots=True)
class _LikePattern:
    """A LIKE pattern split at ``%`` into fixed-length chunks.

    Matching takes the first chunk at the start, the last at the end and every middle chunk at
    its leftmost position after the previous one: with fixed-length chunks the leftmost choice
    is never worse, so this is exact and costs O(len(text) * len(pattern)).
    """

    chunks: tuple[re.Pattern[str], ...]
    last_length: int

    def fullmatch(self, text: str) -> bool:
        first, *middle = self.chunks
        if not middle:
            return first.fullmatch(text) is not None
        found = first.match(text)
        if found is None:
            return False
        position = found.end()
        for chunk in middle[:-1]:
            found = chunk.search(text, position)
            if found is None:
                return False
            position = found.end()
        start = len(text) - self.last_length
        return start >= position and middle[-1].fullmatch(text, start) is not None


@functools.lru_cache(maxsize=512)
def _like(pattern: str) -> _LikePattern:
    _check_length(pattern)
    chunks: list[list[str]] = [[]]
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            if i + 1 == len(pattern):
                raise errors.ValidationError(
                    f"LIKE pattern {pattern!r} ends with the escape character '\\'"
                )
            chunks[-1].append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if char == "%":
            chunks.append([])
        else:
            chunks[-1].append("." if char == "_" else re.escape(char))
        i += 1
    compiled = tuple(re.compile("".join(chunk), re.DOTALL) for chunk in chunks)
    return _LikePattern(compiled, len(chunks[-1]))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"
