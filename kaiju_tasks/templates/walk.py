"""Template walking: validates and renders every template inside a JSON value (pure).

``validate`` and ``render`` walk dicts and lists (at most ``[limits] value_depth`` levels; keys
are never templated): a template string is parsed, and rendered against the task data; a
backtick literal loses its backticks; every other value passes through. Errors name the dotted
field the template sits in. ``stage_references`` lists the stage results templates must read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any, Final

from kaiju_tasks import errors, limits, values
from kaiju_tasks.templates import lexer, nodes, parser

MAX_VALUE_DEPTH: Final = limits.DEFAULT.value_depth
"""Deepest nesting of dicts and lists that ``validate`` and ``render`` walk (levels, by default;
``[limits] value_depth``)."""


def validate(value: Any, field: str = "params") -> None:
    """Check every template string inside ``value``.

    Args:
        value: a JSON value; dicts and lists are walked.
        field: the name of ``value``, used to build the dotted path reported in errors.

    Raises:
        errors.ValidationError: a template is malformed; ``field`` is the dotted path to it
            (e.g. ``'params.conditions.id'``).
    """
    _validate(value, field, 0)


def render(
    value: Any,
    data: Mapping[str, Any],
    *,
    now: datetime | None = None,
    field: values.Where = "params",
    budget: values.Budget | None = None,
) -> values.JSONValue:
    """Render every template inside ``value`` against ``data``.

    The work is bounded: the rendered value may be at most ``[limits] rendered_bytes`` of JSON
    (checked while it is built, so a larger value never exists) and the rendering may take at
    most ``[limits] eval_steps`` steps.

    Args:
        value: a JSON value; dicts and lists are rendered recursively.
        data: the task data: ``{'id', 'kws', 'executor', '0', '1', ...}``.
        now: the current time, for ``[!x:now]`` and ``[!x:timestamp]``.
        field: the name of ``value``, used to build the dotted path reported in errors.
        budget: the work allowance to draw from (shared with a condition being evaluated);
            a fresh one by default.

    Returns:
        A new value with every template replaced by its result.

    Raises:
        errors.ValidationError: a template is malformed, a path is missing without a default,
            a helper got unusable values, or a limit was passed; ``field`` is the dotted path
            to the template.
    """
    ctx = nodes.Context(data, now, budget or values.Budget())
    result: values.JSONValue = _render(value, ctx, field, 0)
    if ctx.rendered:  # only templates can make a value larger than what was validated
        size = values.json_size(result, limits.active().rendered_bytes, ctx.budget)
        if size > limits.active().rendered_bytes:
            raise errors.ValidationError(
                nodes.too_large("rendered", size), field=values.field_name(field)
            )
    return result


def stage_references(value: Any) -> Iterator[tuple[int, str]]:
    """Yield ``(stage, template)`` for every stage result a template in ``value`` must read.

    Only lookups that fail without the result count: a path with a default (``[3.x:0]``), the
    first argument of ``default()`` and paths built from nested templates are skipped. ``value``
    is a JSON value whose templates are valid (see :func:`validate`).
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if lexer.is_template(item):
                for stage in _strict_stages(parser.parse(item)):
                    yield stage, item
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _strict_stages(root: nodes.Node) -> Iterator[int]:
    stack: list[nodes.Node | nodes.PathSpec] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, nodes.Lookup) and node.default is None and node.path.parts is not None:
            head = node.path.parts[0]
            if head.isdigit() and len(head) < 6:
                yield int(head)
        if isinstance(node, nodes.Call) and node.function.lenient_first and node.args:
            stack.extend(node.args[1:])
            if not isinstance(node.args[0], nodes.Lookup):
                stack.append(node.args[0])
            continue
        stack.extend(nodes.children(node))


def _check_value_depth(depth: int, where: values.Where) -> None:
    bound = limits.active().value_depth
    if depth > bound:
        raise errors.ValidationError(
            f"nested deeper than value_depth ({bound} levels)", field=values.field_name(where)
        )


def _validate(value: Any, where: values.Where, depth: int) -> None:
    _check_value_depth(depth, where)
    if isinstance(value, str):
        if lexer.is_template(value):
            try:
                parser.parse(value)
            except errors.ValidationError as exc:
                raise errors.ValidationError(exc.message, field=values.field_name(where)) from exc
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _validate(item, (where, key), depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _validate(item, (where, index), depth + 1)


def _render(value: Any, ctx: nodes.Context, where: values.Where, depth: int) -> Any:
    _check_value_depth(depth, where)
    if isinstance(value, str):
        if lexer.is_literal(value):
            return value[1:-1]
        if not lexer.is_template(value):
            return value
        try:
            node = parser.parse(value)
        except errors.ValidationError as exc:
            raise errors.ValidationError(exc.message, field=values.field_name(where)) from exc
        try:
            return nodes.evaluate_node(node, ctx)
        except errors.ValidationError as exc:
            raise errors.ValidationError(
                f"template {values.shown(value)}: {exc.message}", field=values.field_name(where)
            ) from exc
    if isinstance(value, Mapping):
        return {key: _render(item, ctx, (where, key), depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_render(item, ctx, (where, i), depth + 1) for i, item in enumerate(value)]
    return value
