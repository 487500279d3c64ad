"""Values: the JSON value rules templates and conditions share (pure).

Both the template renderer (``kaiju_tasks.templates``) and the condition evaluator
(``kaiju_tasks.conditions``) work on JSON-like values and report errors about them the same way;
this module holds what they have in common, so neither has to import the other for it:

- ``JSONValue``/``JSONLike``: the JSON types, as stored and as accepted from callers;
- ``json_equal`` and ``compare``: equality and ordering as JSON means them (``1 == 1.0``,
  ``true`` is not ``1``, only numbers with numbers and strings with strings are ordered);
- ``json_size``: a bounded estimate of a value's size as JSON;
- ``Budget``: the allowance of work (``[limits] eval_steps``) one rendering or one condition
  evaluation draws from, shared when a condition renders its operands' templates;
- ``Where``/``field_name``, ``shown`` and ``type_name``: how error messages name a field, quote
  user text and describe a value's type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeAlias

from kaiju_tasks import errors, limits, redact

JSONValue: TypeAlias = "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"
"""A JSON value, as stored and returned."""


JSONLike: TypeAlias = (
    "Mapping[str, JSONLike] | Sequence[JSONLike] | str | int | float | bool | None"
)
"""A JSON value as accepted from callers (read-only containers, so ``dict[str, int]`` fits)."""


Where: TypeAlias = "str | tuple[Where, Any]"
"""Where a value sits: the field's name, or ``(where its container sits, key or index)``.

Spelled out (:func:`field_name`) only for an error, so walking long keys over long lists copies
no name per item.
"""


def field_name(where: Where) -> str:
    """The dotted name of ``where`` (each key cut to 100 characters)."""
    parts: list[str] = []
    while isinstance(where, tuple):
        where, key = where
        parts.append(str(key)[:100])
    parts.append(where)
    return ".".join(reversed(parts))


def shown(text: str, width: int = 80) -> str:
    """How messages quote user text: ``repr(text)`` cut to ``width``, URL secrets masked."""
    cut = repr(text) if len(text) <= width else f"{text[: width - 3]!r}..."
    return redact.text(cut) if "://" in cut or "pass" in cut else cut


def type_name(value: Any) -> str:
    """How messages name the JSON type of ``value`` (``'a string'``, ``'null'``, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def is_number(value: Any) -> bool:
    """Whether ``value`` is a JSON number (an int or a float, not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def json_equal(left: Any, right: Any, budget: Budget | None = None) -> bool:
    """Compare two JSON values as JSON does: booleans are not numbers, ``1 == 1.0``.

    With a ``budget``, every value compared is charged to it.
    """
    if left is right and left is not None and not isinstance(left, float):
        return True  # the same object (e.g. one path read twice); NaN never reaches here
    if budget is not None:
        budget.chars(len(left) if isinstance(left, str) else 0)
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left is right
    if is_number(left) and is_number(right):
        return bool(left == right)
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(
            json_equal(a, b, budget) for a, b in zip(left, right, strict=True)
        )
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        if budget is not None:
            budget.charge(len(left))  # comparing the key sets
        return left.keys() == right.keys() and all(
            json_equal(v, right[k], budget) for k, v in left.items()
        )
    if isinstance(left, list | tuple | Mapping) or isinstance(right, list | tuple | Mapping):
        return False
    return bool(type(left) is type(right) and left == right)


def compare(left: Any, right: Any) -> int | None:
    """Order two values: -1, 0 or 1, or ``None`` unless both are numbers or both are strings."""
    if (is_number(left) and is_number(right)) or (isinstance(left, str) and isinstance(right, str)):
        return int(left > right) - int(left < right)
    return None


CHARS_PER_STEP: Final = 1024  # copying or comparing this many characters costs one step


def json_size(value: Any, bound: int, budget: Budget | None = None) -> int:
    """Estimate the size of ``value`` as JSON (bytes, at least), stopping once past ``bound``.

    Strings count their characters (a lower bound of their UTF-8 bytes), so the estimate never
    exceeds the encoded size by more than the punctuation; the walk stops as soon as the total
    passes ``bound`` and charges ``budget`` for what it visited.
    """
    total = 0
    stack = [value]
    visited = 0
    while stack:
        item = stack.pop()
        visited += 1
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, Mapping):
            total += 2
            for key, child in item.items():
                total += len(key) + 4 if isinstance(key, str) else 8
                stack.append(child)
        elif isinstance(item, list | tuple):
            total += 2 + len(item)
            stack.extend(item)
        elif item is None or isinstance(item, bool):
            total += 5
        else:
            total += 8 if isinstance(item, int | float) else len(str(item))
        if total > bound:
            break
    if budget is not None:
        budget.charge(visited + total // CHARS_PER_STEP)
    return total


class Budget:
    """The work one rendering or one condition evaluation may do, in steps.

    A step is about one node evaluated, one value visited, 1,024 characters copied or compared,
    or 40 characters matched by a pattern; the allowance is ``[limits] eval_steps``. Past it,
    the rendering fails with an ``errors.ValidationError`` naming the limit: whatever a task
    holds, its templates and conditions cost a bounded time.
    """

    __slots__ = ("left", "limit")

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limits.active().eval_steps if limit is None else limit
        self.left = self.limit

    def charge(self, steps: int) -> None:
        """Spend ``steps``; raise errors.ValidationError once the allowance is spent."""
        self.left -= steps
        if self.left < 0:
            raise errors.ValidationError(
                f"too much work: more than eval_steps ({self.limit:,} steps) to evaluate"
            )

    def chars(self, count: int) -> None:
        """Spend the steps of copying, comparing or matching ``count`` characters."""
        self.charge(1 + count // CHARS_PER_STEP)
