"""Template functions: the fixed whitelist ``[!x:name:arg:...]`` may call (pure).

Each function takes the evaluation context and its evaluated arguments, checks their types
and charges the work budget for what it copies or walks. ``now`` and ``timestamp`` read the time
given to the rendering, never the clock; ``uuid4`` is the only function whose result is not a
function of its inputs. Nothing outside ``FUNCTIONS`` can be called.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from kaiju_tasks import errors, values
from kaiju_tasks.templates import lexer, nodes


def _now(ctx: nodes.Context) -> datetime:
    now = ctx.now
    if now is None:
        raw = ctx.data.get("now")
        if isinstance(raw, datetime):
            now = raw
        elif isinstance(raw, str):
            now = _parse_datetime(raw)
        else:
            raise errors.ValidationError(
                "the current time is unknown: pass render(..., now=...) or put 'now' in the data"
            )
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now.astimezone(UTC)


def _parse_datetime(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise errors.ValidationError(
            f"{values.shown(text)} is not an ISO-8601 date and time"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _need(value: Any, kinds: type | tuple[type, ...], what: str, name: str) -> Any:
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        raise errors.ValidationError(f"{name}() needs {what}, got {values.type_name(value)}")
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _fn_len(ctx: nodes.Context, args: list[Any]) -> Any:
    return len(_need(args[0], (str, list, tuple, dict), "a string, list or object", "len"))


def _fn_int(ctx: nodes.Context, args: list[Any]) -> Any:
    value = _need(args[0], (int, float, str, bool), "a number or a string", "int")
    if isinstance(value, str) and len(value) > lexer.MAX_NUMBER_CHARS:
        raise errors.ValidationError("int() got a string that is too long")
    return int(value)


def _fn_float(ctx: nodes.Context, args: list[Any]) -> Any:
    value = _need(args[0], (int, float, str, bool), "a number or a string", "float")
    if isinstance(value, str) and len(value) > lexer.MAX_NUMBER_CHARS:
        raise errors.ValidationError("float() got a string that is too long")
    result = float(value)
    if not math.isfinite(result):
        raise errors.ValidationError("float() result is not a finite number")
    return result


def _numbers(value: Any, name: str, budget: values.Budget) -> list[Any]:
    items = list(_need(value, (list, tuple), "a list", name))
    budget.charge(len(items))
    for item in items:
        _need(item, (int, float), "a list of numbers", name)
    return items


def _fn_sum(ctx: nodes.Context, args: list[Any]) -> Any:
    return sum(_numbers(args[0], "sum", ctx.budget))


def _extreme(
    args: list[Any], name: str, pick: Callable[[list[Any]], Any], budget: values.Budget
) -> Any:
    items = list(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else args
    budget.charge(len(items))
    if items and isinstance(items[0], str):
        budget.chars(sum(len(x) for x in items if isinstance(x, str)))
    if not items:
        raise errors.ValidationError(f"{name}() of an empty list")
    if not all(values.is_number(x) for x in items) and not all(isinstance(x, str) for x in items):
        raise errors.ValidationError(f"{name}() needs all numbers or all strings")
    return pick(items)


def _fn_min(ctx: nodes.Context, args: list[Any]) -> Any:
    return _extreme(args, "min", min, ctx.budget)


def _fn_max(ctx: nodes.Context, args: list[Any]) -> Any:
    return _extreme(args, "max", max, ctx.budget)


def _fn_first(ctx: nodes.Context, args: list[Any]) -> Any:
    items = _need(args[0], (list, tuple), "a list", "first")
    return items[0] if items else None


def _fn_last(ctx: nodes.Context, args: list[Any]) -> Any:
    items = _need(args[0], (list, tuple), "a list", "last")
    return items[-1] if items else None


def _fn_upper(ctx: nodes.Context, args: list[Any]) -> Any:
    text = _need(args[0], str, "a string", "upper")
    _charge_case(ctx.budget, text)
    return text.upper()


def _fn_lower(ctx: nodes.Context, args: list[Any]) -> Any:
    text = _need(args[0], str, "a string", "lower")
    _charge_case(ctx.budget, text)
    return text.lower()


def _charge_case(budget: values.Budget, text: str) -> None:
    # Mapping the case of non-ASCII text looks every character up: about 30 times the cost of
    # copying it (ASCII is mapped at copying speed).
    budget.chars(len(text) if text.isascii() else len(text) * 32)


def _fn_join(ctx: nodes.Context, args: list[Any]) -> Any:
    separator = _need(args[0], str, "a string separator", "join")
    texts = []
    size = 0
    for item in _need(args[1], (list, tuple), "a list", "join"):
        text = nodes.to_text(item, ctx.budget)
        size += len(text) + len(separator)
        nodes.check_size(size, ctx.budget, len(text) + len(separator))
        texts.append(text)
    return separator.join(texts)


def _fn_split(ctx: nodes.Context, args: list[Any]) -> Any:
    separator = _need(args[0], str, "a string separator", "split")
    if not separator:
        raise errors.ValidationError("split() needs a non-empty separator")
    text = _need(args[1], str, "a string", "split")
    ctx.budget.chars(len(text))
    parts = text.count(separator) + 1
    ctx.budget.charge(parts)
    nodes.check_size(len(text) + 3 * parts, ctx.budget, 0)
    return text.split(separator)


def _fn_abs(ctx: nodes.Context, args: list[Any]) -> Any:
    return abs(_need(args[0], (int, float), "a number", "abs"))


def _fn_round(ctx: nodes.Context, args: list[Any]) -> Any:
    value = _need(args[0], (int, float), "a number", "round")
    if len(args) == 1:
        return round(value)
    digits = _need(args[1], int, "an integer number of digits", "round")
    return round(value, max(-400, min(400, digits)))


def _fn_str(ctx: nodes.Context, args: list[Any]) -> Any:
    return nodes.to_text(args[0], ctx.budget)


def _fn_bool(ctx: nodes.Context, args: list[Any]) -> Any:
    return bool(args[0])


def _fn_not(ctx: nodes.Context, args: list[Any]) -> Any:
    return not args[0]


def _fn_keys(ctx: nodes.Context, args: list[Any]) -> Any:
    mapping = _need(args[0], Mapping, "an object", "keys")
    ctx.budget.charge(len(mapping))
    return list(mapping.keys())


def _fn_values(ctx: nodes.Context, args: list[Any]) -> Any:
    mapping = _need(args[0], Mapping, "an object", "values")
    ctx.budget.charge(len(mapping))
    return list(mapping.values())


def _fn_default(ctx: nodes.Context, args: list[Any]) -> Any:
    return args[1] if args[0] is None else args[0]


def _fn_now(ctx: nodes.Context, args: list[Any]) -> Any:
    return _now(ctx).isoformat()


def _fn_timestamp(ctx: nodes.Context, args: list[Any]) -> Any:
    moment = (
        _now(ctx) if not args else _parse_datetime(_need(args[0], str, "a string", "timestamp"))
    )
    return math.floor(moment.timestamp())


def _fn_uuid4(ctx: nodes.Context, args: list[Any]) -> Any:
    return str(uuid.uuid4())


FUNCTIONS: Final[Mapping[str, nodes.Function]] = {
    "len": nodes.Function(_fn_len, 1, 1),
    "int": nodes.Function(_fn_int, 1, 1),
    "float": nodes.Function(_fn_float, 1, 1),
    "str": nodes.Function(_fn_str, 1, 1),
    "bool": nodes.Function(_fn_bool, 1, 1),
    "not": nodes.Function(_fn_not, 1, 1),
    "sum": nodes.Function(_fn_sum, 1, 1),
    "min": nodes.Function(_fn_min, 1, None),
    "max": nodes.Function(_fn_max, 1, None),
    "first": nodes.Function(_fn_first, 1, 1),
    "last": nodes.Function(_fn_last, 1, 1),
    "upper": nodes.Function(_fn_upper, 1, 1),
    "lower": nodes.Function(_fn_lower, 1, 1),
    "join": nodes.Function(_fn_join, 2, 2),
    "split": nodes.Function(_fn_split, 2, 2),
    "abs": nodes.Function(_fn_abs, 1, 1),
    "round": nodes.Function(_fn_round, 1, 2),
    "keys": nodes.Function(_fn_keys, 1, 1),
    "values": nodes.Function(_fn_values, 1, 1),
    "default": nodes.Function(_fn_default, 2, 2, lenient_first=True),
    "now": nodes.Function(_fn_now, 0, 0),
    "timestamp": nodes.Function(_fn_timestamp, 0, 1),
    "uuid4": nodes.Function(_fn_uuid4, 0, 0),
}
