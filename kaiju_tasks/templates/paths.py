"""Template paths: looks dotted paths up in the task data (pure).

A path such as ``0.data.id`` is followed key by key: a mapping takes the key (or the key read as
an integer), a list takes an integer as an index (negative from the end) and maps any other key
over its elements. A missing path is ``MISSING``, or the caller's fallback, or an
``errors.ValidationError`` that says which key was absent. The same rules serve templates
(``[0.data.id]``) and condition keys (``{'0.data.id': ...}``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeAlias

from kaiju_tasks import errors, values

_INT_RE: Final = re.compile(r"-?[0-9]+")


class _Missing:
    """Marks a path that is not in the data."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Final = _Missing()


Fallback: TypeAlias = Callable[[], Any] | None


def get_path(
    data: Any, path: str, default: Any = MISSING, budget: values.Budget | None = None
) -> Any:
    """Look up a dotted path in ``data`` with the template path rules.

    Args:
        data: the value to look into.
        path: dot-separated keys, e.g. ``'0.data.id'``.
        default: returned when the path is missing or ``None``; without it a missing path
            raises.
        budget: the work allowance the lookup draws from (elements a list maps over).

    Returns:
        The value found (a list when the path maps over a list).

    Raises:
        errors.ValidationError: the path is empty or malformed, or missing without a default.
    """
    parts = tuple(path.split("."))
    if "" in parts:
        raise errors.ValidationError(f"invalid path {values.shown(path)}: empty key")
    if default is MISSING:
        return lookup_strict(data, parts, budget)
    return walk(data, parts, 0, lambda: default, budget)


def _as_index(part: str) -> int | None:
    if len(part) > 18 or not _INT_RE.fullmatch(part):
        return None
    return int(part)


def walk(
    value: Any,
    parts: tuple[str, ...],
    start: int,
    fallback: Fallback,
    budget: values.Budget | None = None,
) -> Any:
    """Follow ``parts[start:]``; a missing (or ``None``) end takes ``fallback()``, else ``MISSING``.

    With a ``budget``, each element a list maps over is charged to it.
    """
    for i in range(start, len(parts)):
        part = parts[i]
        if isinstance(value, Mapping):
            if part in value:
                value = value[part]
                continue
            index = _as_index(part)
            if index is not None and index in value:
                value = value[index]
                continue
        elif isinstance(value, list | tuple):
            index = _as_index(part)
            if index is None:
                if budget is not None:
                    budget.charge(len(value))
                mapped = []
                for item in value:
                    result = walk(item, parts, i, fallback, budget)
                    if result is MISSING:
                        return MISSING
                    mapped.append(result)
                return mapped
            if -len(value) <= index < len(value):
                value = value[index]
                continue
        return MISSING if fallback is None else fallback()
    if value is None and fallback is not None:
        return fallback()
    return value


def lookup_strict(data: Any, parts: tuple[str, ...], budget: values.Budget | None = None) -> Any:
    """Follow ``parts``; a missing path raises errors.ValidationError saying which key is absent."""
    value = walk(data, parts, 0, None, budget)
    if value is MISSING:
        path = ".".join(parts)
        explained = _explain_missing(data, parts, budget or values.Budget())
        raise errors.ValidationError(f"path {values.shown(path)} not found: {explained}")
    return value


def _explain_missing(value: Any, parts: tuple[str, ...], budget: values.Budget) -> str:
    """Say which key of a missing path is absent (only called on the error path).

    The search for the list element that lacks the key walks again what the lookup walked, so
    it draws from the same budget.
    """
    done: tuple[str, ...] = ()  # the keys already followed, to say where the lookup stopped
    i = 0
    while i < len(parts):
        part = parts[i]
        where = values.shown(".".join(done)) if done else "the data"
        if isinstance(value, Mapping):
            index = _as_index(part)
            if part in value:
                value = value[part]
            elif index is not None and index in value:
                value = value[index]
            else:
                return f"{where} has no key {values.shown(part)}"
        elif isinstance(value, list | tuple):
            index = _as_index(part)
            if index is None:
                budget.charge(len(value))
                for n, item in enumerate(value):
                    if walk(item, parts, i, None, budget) is MISSING:
                        value, done = item, (*done, str(n))
                        break
                else:  # pragma: no cover - a list whose every element has the key is no miss
                    return f"{where} has no key {values.shown(part)}"
                continue  # the same part, inside the element that lacks it
            if not -len(value) <= index < len(value):
                return f"index {index} is out of range for {where} (length {len(value)})"
            value = value[index]
        else:
            return f"{where} is {values.type_name(value)}, it has no key {values.shown(part)}"
        done = (*done, part)
        i += 1
    return "no value"  # pragma: no cover - a path that resolves is not missing
