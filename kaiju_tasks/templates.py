"""Templates: renders stage params from the task data (pure).

The data a stage sees is a JSON-like mapping such as
``{'id': 'my_task', 'kws': {...}, 'executor': {...}, '0': <result of stage 0>, '1': ...}``.

Where templates apply
    ``render`` walks dicts and lists (dict keys are never templated). A string that starts with
    ``[`` and ends with ``]`` is a template; it must be *one* ``[...]`` group, so ``'[a]-[b]'`` is a
    malformed template (build text with ``[!f:...]`` instead). A string that starts and ends with
    a backtick is a literal: the backticks are stripped and nothing inside is interpreted
    (``'`[not a template]`'`` renders to ``'[not a template]'``). Every other value passes
    through unchanged. A template keeps the type of what it finds (a dict stays a dict).

Paths: ``[kws.command_name]``
    Dot-separated keys looked up in the data. A step into a list takes an integer part as an
    index (``[0.data.1.id]``, negative indexes count from the end); any other part maps the rest
    of the path over the list's elements (``[0.data.id]`` -> ``['001', '005']``). A missing
    path, without a default, is an ``errors.ValidationError`` naming the template and the key.
    Paths are taken verbatim: no whitespace is trimmed and backticks are not allowed in them.

Defaults: ``[key:default]``
    Everything after the first ``:`` is the default, used when the path is missing or ``None``
    (when mapping over a list, per element). A bare default is read as a JSON scalar: ``1``,
    ``1.5``, ``true``, ``false``, ``null``; anything else is the raw string (``[x:abc]``,
    ``[x:]`` is ``''``). A backtick-quoted default is a literal string (``[x:`a:b`]``), and a
    default that is one ``[template]`` is rendered only when it is needed (``[x:[y:0]]``).

Nesting: ``[[kws.key_name]]``
    A ``[...]`` group inside a path is rendered first; its result (a string or an integer) is
    spliced into the path, which is then split on dots: ``[kws.[kws.field]]``.

Helpers (``!`` right after the opening bracket)
    ``[!x:func:arg:...]`` calls a function from a fixed whitelist; arguments are separated by
    ``:``. An argument is a backtick-quoted string, a ``[template]``, a JSON scalar literal
    (``2``, ``1.5``, ``true``, ``false``, ``null``) or else a path (``0.data``); use ``[0]`` to
    look up a path that would read as a number. Functions: ``len(x)``, ``int(x)``,
    ``float(x)``, ``str(x)`` (non-strings become JSON), ``bool(x)``, ``not(x)`` (truthiness),
    ``sum(list)``, ``min``/``max`` (one list, or several arguments), ``first(list)``,
    ``last(list)`` (``None`` when empty), ``upper(s)``, ``lower(s)``, ``join(sep, list)``,
    ``split(sep, s)``, ``abs(x)``, ``round(x[, ndigits])``, ``keys(obj)``, ``values(obj)``,
    ``default(x, fallback)`` (``x`` may be missing), ``now()`` (ISO-8601 UTC string),
    ``timestamp([iso])`` (integer Unix seconds of now or of an ISO string) and ``uuid4()``.
    ``now``/``timestamp`` read the ``now`` given to ``render`` (or an aware ``datetime`` or ISO
    string under ``data['now']``): rendering stays a function of its inputs (``uuid4`` aside).

    ``[!e:expr]`` evaluates a small expression: numbers, backtick strings, ``true``, ``false``,
    ``null``, bare paths (letters, digits, ``_`` and ``.``), ``[templates]``, parentheses,
    ``+ - * / %`` (numbers; ``+`` also joins two strings or two lists), ``== != < > <= >=``
    (ordering only between two numbers or two strings; no chaining), ``and``, ``or``, ``not``
    (results are booleans). ``[!e:[0.count] * 2 > 10 and kws.mode == `fast`]``.

    ``[!f:text]`` formats text: ``{...}`` holds any template body (``{kws.name}``,
    ``{x:default}``, ``{!x:len:0.data}``) and is replaced by its value (non-strings as JSON);
    ``{{`` and ``}}`` are literal braces, backtick-quoted text is copied without the backticks,
    and brackets in the text are ordinary characters (they must still balance, or be quoted).

Nothing is ever ``eval``-ed: templates are parsed by the small parser below, and parses are
cached, so validating at create time and rendering in the executor parse each template once.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import dataclasses
import functools
import json
import math
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from kaiju_tasks import errors, limits, redact

if TYPE_CHECKING:
    from kaiju_tasks import conditions

    # At run time ``Condition`` comes from the module ``__getattr__`` below: conditions imports
    # this module, so importing it here eagerly would form a cycle.
    Condition = conditions.Condition

JSONValue: TypeAlias = "dict[str, JSONValue] | list[JSONValue] | str | int | float | bool | None"
"""A JSON value, as stored and returned."""

JSONLike: TypeAlias = (
    "Mapping[str, JSONLike] | Sequence[JSONLike] | str | int | float | bool | None"
)
"""A JSON value as accepted from callers (read-only containers, so ``dict[str, int]`` fits)."""

MAX_NESTING: Final = limits.DEFAULT.template_nesting
"""Deepest nesting of templates, parentheses and unary operators inside one template (levels,
by default; ``[limits] template_nesting``)."""

MAX_VALUE_DEPTH: Final = limits.DEFAULT.value_depth
"""Deepest nesting of dicts and lists that ``validate`` and ``render`` walk (levels, by default;
``[limits] value_depth``)."""

_CHARS_PER_STEP: Final = 1024  # copying or comparing this many characters costs one step

_MAX_INT_BITS: Final = 1024  # an !e result beyond this is refused: it would not be useful JSON
_MAX_NUMBER_CHARS: Final = 400  # longer numeric literals are refused before int()/float()

_HELPERS: Final = ("!x:", "!e:", "!f:")
_INT_RE: Final = re.compile(r"-?[0-9]+")
_JSON_NUMBER_RE: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_EXPR_NUMBER_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_WORD_RE: Final = re.compile(r"[\w.]+")
_COMPARISONS: Final = frozenset({"==", "!=", "<", ">", "<=", ">="})
_KEYWORDS: Final = frozenset({"and", "or", "not"})


class _Missing:
    """Marks a path that is not in the data."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()

_Segment: TypeAlias = tuple[str, str]  # (kind, raw text); kind is "text", "group" or "quoted"
_Fallback: TypeAlias = Callable[[], Any] | None


def __getattr__(name: str) -> Any:
    """Resolve ``Condition`` lazily: it lives in ``kaiju_tasks.conditions``, which imports us."""
    if name == "Condition":
        from kaiju_tasks import conditions

        return conditions.Condition
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- public API ---------------------------------------------------------------------------------


def is_template(value: object) -> bool:
    """Whether ``value`` is a template string: it starts with ``[`` and ends with ``]``."""
    return isinstance(value, str) and len(value) >= 2 and value[0] == "[" and value[-1] == "]"


def is_literal(value: object) -> bool:
    """Whether ``value`` is a backtick-quoted literal string (rendered without its backticks)."""
    return isinstance(value, str) and len(value) >= 2 and value[0] == "`" and value[-1] == "`"


def parse(template: str) -> Node:
    """Parse a template string into a renderable node (cached).

    Args:
        template: a string that starts with ``[`` and ends with ``]``.

    Returns:
        The parsed template; render it with ``Node.render(data)``.

    Raises:
        errors.ValidationError: the string is not a template or is malformed.
    """
    if not is_template(template):
        raise errors.ValidationError(
            f"not a template: {shown(template)} must start with '[' and end with ']'"
        )
    node = _CACHE.get(template)
    if node is None:
        node = _parse_uncached(template)
        _CACHE.put(template, node)
    return node


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
    field: Where = "params",
    budget: Budget | None = None,
) -> JSONValue:
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
    ctx = _Context(data, now, budget or Budget())
    result: JSONValue = _render(value, ctx, field, 0)
    if ctx.rendered:  # only templates can make a value larger than what was validated
        size = json_size(result, limits.active().rendered_bytes, ctx.budget)
        if size > limits.active().rendered_bytes:
            raise errors.ValidationError(_too_large("rendered", size), field=field_name(field))
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
            if is_template(item):
                for stage in _strict_stages(parse(item)):
                    yield stage, item
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def _strict_stages(root: Node) -> Iterator[int]:
    stack: list[Node | _PathSpec] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, _Lookup) and node.default is None and node.path.parts is not None:
            head = node.path.parts[0]
            if head.isdigit() and len(head) < 6:
                yield int(head)
        if isinstance(node, _Call) and node.function.lenient_first and node.args:
            stack.extend(node.args[1:])
            if not isinstance(node.args[0], _Lookup):
                stack.append(node.args[0])
            continue
        stack.extend(_children(node))


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
        budget.charge(visited + total // _CHARS_PER_STEP)
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
        self.charge(1 + count // _CHARS_PER_STEP)


def get_path(data: Any, path: str, default: Any = _MISSING, budget: Budget | None = None) -> Any:
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
        raise errors.ValidationError(f"invalid path {shown(path)}: empty key")
    if default is _MISSING:
        return _lookup_strict(data, parts, budget)
    return _walk(data, parts, 0, lambda: default, budget)


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
    if _is_number(left) and _is_number(right):
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
    if (_is_number(left) and _is_number(right)) or (
        isinstance(left, str) and isinstance(right, str)
    ):
        return int(left > right) - int(left < right)
    return None


# --- nodes --------------------------------------------------------------------------------------


class _Context:
    """What a rendering reads (the data, the time) and the work it may still do."""

    __slots__ = ("budget", "data", "now", "rendered")

    def __init__(self, data: Mapping[str, Any], now: datetime | None, budget: Budget) -> None:
        self.data = data
        self.now = now
        self.budget = budget
        self.rendered = False  # a template was evaluated: the result may outgrow the input


class Node(abc.ABC):
    """A parsed template, as returned by ``parse``."""

    __slots__ = ()

    def render(
        self, data: Mapping[str, Any], *, now: datetime | None = None, budget: Budget | None = None
    ) -> Any:
        """Evaluate the template against ``data`` (raises errors.ValidationError on failure)."""
        ctx = _Context(data, now, budget or Budget())
        value = _evaluate_node(self, ctx)
        size = json_size(value, limits.active().rendered_bytes, ctx.budget)
        if size > limits.active().rendered_bytes:
            raise errors.ValidationError(_too_large("rendered", size))
        return value

    @abc.abstractmethod
    def _eval(self, ctx: _Context) -> Any: ...


@dataclasses.dataclass(frozen=True, slots=True)
class _Const(Node):
    source: str
    value: Any

    def _eval(self, ctx: _Context) -> Any:
        return self.value


@dataclasses.dataclass(frozen=True, slots=True)
class _PathSpec:
    """A path; ``parts`` is set when it has no nested templates."""

    source: str
    pieces: tuple[str | Node, ...]
    parts: tuple[str, ...] | None

    def resolve(self, ctx: _Context) -> tuple[str, ...]:
        if self.parts is not None:
            return self.parts
        text: list[str] = []
        for piece in self.pieces:
            if isinstance(piece, str):
                text.append(piece)
                continue
            value = piece._eval(ctx)
            if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
                text.append(str(value))
            else:
                raise errors.ValidationError(
                    f"nested template {shown(_source(piece))} must render to a string,"
                    f" got {_type_name(value)}"
                )
        path = "".join(text)
        parts = tuple(path.split("."))
        if "" in parts:
            raise errors.ValidationError(f"path {shown(path)} has an empty key")
        return parts


@dataclasses.dataclass(frozen=True, slots=True)
class _Lookup(Node):
    source: str
    path: _PathSpec
    default: Node | None

    def _eval(self, ctx: _Context) -> Any:
        ctx.budget.charge(1)
        if self.default is None:
            return _lookup_strict(ctx.data, self.path.resolve(ctx), ctx.budget)
        return self.lookup(ctx, functools.cache(functools.partial(self.default._eval, ctx)))

    def lookup(self, ctx: _Context, fallback: _Fallback) -> Any:
        """Look the path up; ``fallback`` supplies missing or ``None`` values (or ``_MISSING``)."""
        return _walk(ctx.data, self.path.resolve(ctx), 0, fallback, ctx.budget)


@dataclasses.dataclass(frozen=True, slots=True)
class _Function:
    impl: Callable[[_Context, list[Any]], Any]
    min_args: int
    max_args: int | None
    lenient_first: bool = False  # the first argument may be a missing path (it is then None)


@dataclasses.dataclass(frozen=True, slots=True)
class _Call(Node):
    source: str
    name: str
    function: _Function
    args: tuple[Node, ...]

    def _eval(self, ctx: _Context) -> Any:
        values: list[Any] = []
        for index, arg in enumerate(self.args):
            if index == 0 and self.function.lenient_first and isinstance(arg, _Lookup):
                value = arg.lookup(ctx, None)
                values.append(None if value is _MISSING else value)
            else:
                values.append(arg._eval(ctx))
        ctx.budget.charge(1)
        try:
            result = self.function.impl(ctx, values)
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise errors.ValidationError(f"!x:{self.name} failed: {exc}") from exc
        if isinstance(result, float) and not math.isfinite(result):
            raise errors.ValidationError(f"!x:{self.name} result is not a finite number")
        return result


@dataclasses.dataclass(frozen=True, slots=True)
class _Format(Node):
    source: str
    pieces: tuple[str | Node, ...]

    def _eval(self, ctx: _Context) -> Any:
        texts = []
        size = 0
        for piece in self.pieces:
            text = piece if isinstance(piece, str) else _to_text(piece._eval(ctx), ctx.budget)
            size += len(text)
            _check_size(size, ctx.budget, len(text))
            texts.append(text)
        return "".join(texts)


@dataclasses.dataclass(frozen=True, slots=True)
class _Unary(Node):
    source: str
    operand: Node

    def _eval(self, ctx: _Context) -> Any:
        ctx.budget.charge(1)
        value = self.operand._eval(ctx)
        if self.source == "not":
            return not value
        if not _is_number(value):
            raise errors.ValidationError(
                f"unary {self.source!r} needs a number, got {_type_name(value)}"
            )
        return -value if self.source == "-" else value


@dataclasses.dataclass(frozen=True, slots=True)
class _Binary(Node):
    source: str  # the operator
    left: Node
    right: Node

    def _eval(self, ctx: _Context) -> Any:
        ctx.budget.charge(1)
        op = self.source
        if op == "and":
            return bool(self.left._eval(ctx)) and bool(self.right._eval(ctx))
        if op == "or":
            return bool(self.left._eval(ctx)) or bool(self.right._eval(ctx))
        left = self.left._eval(ctx)
        right = self.right._eval(ctx)
        if op == "==":
            return json_equal(left, right, ctx.budget)
        if op == "!=":
            return not json_equal(left, right, ctx.budget)
        if op in _COMPARISONS:
            if isinstance(left, str):
                ctx.budget.chars(len(left))
            order = compare(left, right)
            if order is None:
                raise errors.ValidationError(
                    f"cannot compare {_type_name(left)} and {_type_name(right)} with {op!r}"
                )
            return {"<": order < 0, ">": order > 0, "<=": order <= 0, ">=": order >= 0}[op]
        return _arithmetic(op, left, right, ctx.budget)


@dataclasses.dataclass(frozen=True, slots=True)
class _Expression(Node):
    source: str
    root: Node

    def _eval(self, ctx: _Context) -> Any:
        value = self.root._eval(ctx)
        if isinstance(value, float) and not math.isfinite(value):
            raise errors.ValidationError("expression result is not a finite number")
        return value


# --- path lookup --------------------------------------------------------------------------------


def _as_index(part: str) -> int | None:
    if len(part) > 18 or not _INT_RE.fullmatch(part):
        return None
    return int(part)


def _walk(
    value: Any,
    parts: tuple[str, ...],
    start: int,
    fallback: _Fallback,
    budget: Budget | None = None,
) -> Any:
    """Follow ``parts[start:]``; a missing (or ``None``) end takes ``fallback()``, else _MISSING.

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
                    result = _walk(item, parts, i, fallback, budget)
                    if result is _MISSING:
                        return _MISSING
                    mapped.append(result)
                return mapped
            if -len(value) <= index < len(value):
                value = value[index]
                continue
        return _MISSING if fallback is None else fallback()
    if value is None and fallback is not None:
        return fallback()
    return value


def _lookup_strict(data: Any, parts: tuple[str, ...], budget: Budget | None = None) -> Any:
    value = _walk(data, parts, 0, None, budget)
    if value is _MISSING:
        path = ".".join(parts)
        explained = _explain_missing(data, parts, budget or Budget())
        raise errors.ValidationError(f"path {shown(path)} not found: {explained}")
    return value


def _explain_missing(value: Any, parts: tuple[str, ...], budget: Budget) -> str:
    """Say which key of a missing path is absent (only called on the error path).

    The search for the list element that lacks the key walks again what the lookup walked, so
    it draws from the same budget.
    """
    done: tuple[str, ...] = ()  # the keys already followed, to say where the lookup stopped
    i = 0
    while i < len(parts):
        part = parts[i]
        where = shown(".".join(done)) if done else "the data"
        if isinstance(value, Mapping):
            index = _as_index(part)
            if part in value:
                value = value[part]
            elif index is not None and index in value:
                value = value[index]
            else:
                return f"{where} has no key {shown(part)}"
        elif isinstance(value, list | tuple):
            index = _as_index(part)
            if index is None:
                budget.charge(len(value))
                for n, item in enumerate(value):
                    if _walk(item, parts, i, None, budget) is _MISSING:
                        value, done = item, (*done, str(n))
                        break
                else:  # pragma: no cover - a list whose every element has the key is no miss
                    return f"{where} has no key {shown(part)}"
                continue  # the same part, inside the element that lacks it
            if not -len(value) <= index < len(value):
                return f"index {index} is out of range for {where} (length {len(value)})"
            value = value[index]
        else:
            return f"{where} is {_type_name(value)}, it has no key {shown(part)}"
        done = (*done, part)
        i += 1
    return "no value"  # pragma: no cover - a path that resolves is not missing


# --- parser -------------------------------------------------------------------------------------


class _ParseCache:
    """Parsed templates, least recently used first, bounded by the characters of their text.

    The bound is ``[limits] template_cache_bytes``; a template longer than a sixteenth of it is
    parsed each time rather than kept, so a few huge templates cannot push out the many small
    ones a pipeline reuses.
    """

    def __init__(self) -> None:
        self._nodes: OrderedDict[str, Node] = OrderedDict()
        self.size = 0

    def get(self, template: str) -> Node | None:
        node = self._nodes.get(template)
        if node is not None:
            self._nodes.move_to_end(template)
        return node

    def put(self, template: str, node: Node) -> None:
        bound = limits.active().template_cache_bytes
        if len(template) > bound // 64 or template in self._nodes:
            return
        self._nodes[template] = node
        self.size += len(template)
        while self.size > bound:
            evicted, _ = self._nodes.popitem(last=False)
            self.size -= len(evicted)

    def clear(self) -> None:
        self._nodes.clear()
        self.size = 0


_CACHE: Final = _ParseCache()


def _parse_uncached(template: str) -> Node:
    bound = limits.active().template_chars
    if len(template) > bound:
        raise errors.ValidationError(
            f"template is {len(template):,} characters, more than template_chars ({bound:,})"
        )
    # The parser reads a group's text once per level it is nested in: bound the product.
    deepest = _nesting(template)
    if len(template) * deepest > 4 * bound:
        raise errors.ValidationError(
            f"template is too complex to parse: {len(template):,} characters nested {deepest}"
            f" levels (characters times levels at most 4 x template_chars, {4 * bound:,})"
        )
    try:
        body = template[1:-1]
        _segments(body)  # the outer brackets must enclose one balanced group
        node = _parse_body(body, template, 1)
        nodes = _check_height(node)
    except errors.ValidationError as exc:
        raise errors.ValidationError(f"invalid template {shown(template)}: {exc.message}") from exc
    except RecursionError:
        raise errors.ValidationError(
            f"invalid template {shown(template)}: nested too deeply"
        ) from None
    _charge_parse(nodes)
    return node


_BRACKETS: Final = re.compile(r"[\[\]`]")


def _nesting(template: str) -> int:
    """How deep the ``[...]`` groups of ``template`` nest (backtick-quoted text aside)."""
    depth = deepest = 0
    quoted = False
    for found in _BRACKETS.finditer(template):
        char = found.group()
        if char == "`":
            quoted = not quoted
        elif quoted:
            continue
        elif char == "[":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def shown(text: str, width: int = 80) -> str:
    """How messages quote user text: ``repr(text)`` cut to ``width``, URL secrets masked."""
    cut = repr(text) if len(text) <= width else f"{text[: width - 3]!r}..."
    return redact.text(cut) if "://" in cut or "pass" in cut else cut


def _check_depth(depth: int) -> None:
    bound = limits.active().template_nesting
    if depth > bound:
        raise errors.ValidationError(
            f"nested too deeply (more than template_nesting, {bound} levels)"
        )


def _children(node: Node | _PathSpec) -> Sequence[Node | _PathSpec]:
    if isinstance(node, _Lookup):
        return (node.path,) if node.default is None else (node.path, node.default)
    if isinstance(node, _PathSpec | _Format):
        return [piece for piece in node.pieces if not isinstance(piece, str)]
    if isinstance(node, _Call):
        return node.args
    if isinstance(node, _Unary):
        return (node.operand,)
    if isinstance(node, _Binary):
        return (node.left, node.right)
    if isinstance(node, _Expression):
        return (node.root,)
    return ()


def _check_height(root: Node) -> int:
    """Refuse a parsed template whose evaluation would recurse too deeply; return its nodes.

    Each expression's length is bounded as it is tokenized; this bounds the whole tree, where
    expressions nest inside one another: at most ``template_nesting + expression_terms`` nodes
    on any path from the root, so evaluating it never exhausts the interpreter's stack.
    """
    bound = limits.active()
    height_bound = bound.template_nesting + bound.expression_terms
    stack: list[tuple[Node | _PathSpec, int]] = [(root, 1)]
    nodes = 0
    while stack:
        node, height = stack.pop()
        nodes += 1
        if height > height_bound:
            raise errors.ValidationError(
                f"nested too deeply: more than {height_bound} levels of operations"
                " (template_nesting + expression_terms)"
            )
        stack.extend((child, height + 1) for child in _children(node))
    return nodes


class _Allowance:
    """Parse work a request may still cause, in nodes (see :func:`parse_allowance`)."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit


_ALLOWANCE: Final[contextvars.ContextVar[_Allowance | None]] = contextvars.ContextVar(
    "kaiju_tasks_parse_allowance", default=None
)


@contextlib.contextmanager
def parse_allowance(nodes: int | None = None) -> Iterator[None]:
    """Bound the parse work of what runs inside to ``nodes`` nodes of new templates.

    The default is ``[limits] request_template_nodes``. The service wraps each call that takes
    templates (``create``, ``update``) in one, so one request cannot make the process parse
    without end; templates already in the parse cache cost nothing.
    """
    allowance = _Allowance(limits.active().request_template_nodes if nodes is None else nodes)
    token = _ALLOWANCE.set(allowance)
    try:
        yield
    finally:
        _ALLOWANCE.reset(token)


def _charge_parse(nodes: int) -> None:
    allowance = _ALLOWANCE.get()
    if allowance is None:
        return
    allowance.left -= nodes
    if allowance.left < 0:
        raise errors.ValidationError(
            f"the templates of this request take more than request_template_nodes"
            f" ({allowance.limit:,} nodes) to parse: send fewer or simpler templates per request"
        )


def _evaluate_node(node: Node, ctx: _Context) -> Any:
    ctx.rendered = True
    try:
        return node._eval(ctx)
    except RecursionError:
        raise errors.ValidationError("nested too deeply to evaluate") from None


def _group_end(text: str, start: int) -> int:
    """Return the index just past the ``]`` that closes the ``[`` at ``text[start]``."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise errors.ValidationError("unterminated backtick string")
            i = end + 1
            continue
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise errors.ValidationError("unbalanced brackets: missing ']'")


def _segments(text: str) -> list[_Segment]:
    """Split text into plain runs, ``[...]`` groups and backtick-quoted strings."""
    segments: list[_Segment] = []
    i = start = 0
    while i < len(text):
        char = text[i]
        if char not in "[]`":
            i += 1
            continue
        if i > start:
            segments.append(("text", text[start:i]))
        if char == "]":
            raise errors.ValidationError(
                "unbalanced brackets: unexpected ']' (a template is a single [...] group;"
                " use [!f:...] to build text)"
            )
        if char == "[":
            end = _group_end(text, i)
            segments.append(("group", text[i:end]))
        else:
            end = text.find("`", i + 1) + 1
            if end == 0:
                raise errors.ValidationError("unterminated backtick string")
            segments.append(("quoted", text[i:end]))
        i = start = end
    if start < len(text):
        segments.append(("text", text[start:]))
    return segments


def _split(segments: list[_Segment], maxsplit: int = -1) -> list[list[_Segment]]:
    """Split segments on ``:`` in plain runs (never inside groups or quotes)."""
    out: list[list[_Segment]] = [[]]
    for kind, raw in segments:
        if kind != "text":
            out[-1].append((kind, raw))
            continue
        start = 0
        for i, char in enumerate(raw):
            if char == ":" and (maxsplit < 0 or len(out) <= maxsplit):
                if i > start:
                    out[-1].append(("text", raw[start:i]))
                out.append([])
                start = i + 1
        if start < len(raw):
            out[-1].append(("text", raw[start:]))
    return out


def _raw(segments: list[_Segment]) -> str:
    return "".join(raw for _, raw in segments)


def _parse_group(raw: str, depth: int) -> Node:
    """Parse a nested ``[...]`` group (already known to be balanced)."""
    _check_depth(depth)
    return _parse_body(raw[1:-1], raw, depth)


def _parse_body(body: str, source: str, depth: int) -> Node:
    if body.startswith("!"):
        kind = body[:3]
        if kind not in _HELPERS:
            raise errors.ValidationError(
                f"unknown helper {shown(body[:2])}: expected '!x:', '!e:' or '!f:'"
            )
        if kind == "!x:":
            return _parse_call(body[3:], source, depth)
        if kind == "!e:":
            return _Expression(source, _ExpressionParser(body[3:], depth).parse())
        return _parse_format(body[3:], source, depth)
    parts = _split(_segments(body), maxsplit=1)
    path = _parse_path(parts[0], depth)
    default = _parse_default(parts[1], depth) if len(parts) > 1 else None
    return _Lookup(source, path, default)


def _parse_path(segments: list[_Segment], depth: int) -> _PathSpec:
    if not segments:
        raise errors.ValidationError("empty path")
    pieces: list[str | Node] = []
    for kind, raw in segments:
        if kind == "quoted":
            raise errors.ValidationError(f"backtick-quoted text is not allowed in a path: {raw}")
        pieces.append(_parse_group(raw, depth + 1) if kind == "group" else raw)
    source = _raw(segments)
    if all(isinstance(piece, str) for piece in pieces):
        parts = tuple(source.split("."))
        if "" in parts:
            raise errors.ValidationError(f"path {shown(source)} has an empty key")
        return _PathSpec(source, tuple(pieces), parts)
    return _PathSpec(source, tuple(pieces), None)


def _parse_default(segments: list[_Segment], depth: int) -> Node:
    source = _raw(segments)
    if not segments:
        return _Const(source, "")
    if len(segments) == 1 and segments[0][0] == "quoted":
        return _Const(source, source[1:-1])
    if len(segments) == 1 and segments[0][0] == "group":
        return _parse_group(source, depth + 1)
    if any(kind != "text" for kind, _ in segments):
        raise errors.ValidationError(
            f"invalid default {shown(source)}: a default is a literal, one `quoted` string"
            " or one [template]"
        )
    return _Const(source, _scalar(source))


def _scalar(text: str) -> Any:
    """Read a bare literal as a JSON scalar, or keep it as a string."""
    if text in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[text]
    if len(text) <= _MAX_NUMBER_CHARS and _JSON_NUMBER_RE.fullmatch(text):
        number = json.loads(text)
        if not isinstance(number, float) or math.isfinite(number):
            return number
    return text


def _is_scalar_word(text: str) -> bool:
    return text in ("true", "false", "null") or bool(_JSON_NUMBER_RE.fullmatch(text))


def _parse_call(text: str, source: str, depth: int) -> _Call:
    parts = _split(_segments(text))
    name_segments = parts[0]
    if len(name_segments) != 1 or name_segments[0][0] != "text":
        raise errors.ValidationError(f"!x needs a function name, got {shown(_raw(name_segments))}")
    name = name_segments[0][1]
    function = _FUNCTIONS.get(name)
    if function is None:
        raise errors.ValidationError(
            f"unknown function {shown(name)} in !x (known: {', '.join(sorted(_FUNCTIONS))})"
        )
    if len(parts) - 1 > limits.active().expression_terms:
        raise errors.ValidationError(
            f"function {shown(name)} has more than expression_terms"
            f" ({limits.active().expression_terms}) arguments"
        )
    args = tuple(_parse_arg(segments, depth) for segments in parts[1:])
    count = len(args)
    if count < function.min_args or (function.max_args is not None and count > function.max_args):
        expected = (
            f"{function.min_args}"
            if function.max_args == function.min_args
            else f"{function.min_args} to {function.max_args}"
            if function.max_args is not None
            else f"at least {function.min_args}"
        )
        raise errors.ValidationError(f"function {name!r} takes {expected} argument(s), got {count}")
    return _Call(source, name, function, args)


def _parse_arg(segments: list[_Segment], depth: int) -> Node:
    source = _raw(segments)
    if not segments:
        raise errors.ValidationError("empty argument in !x (arguments are separated by ':')")
    if len(segments) == 1 and segments[0][0] == "quoted":
        return _Const(source, source[1:-1])
    if len(segments) == 1 and segments[0][0] == "group":
        return _parse_group(source, depth + 1)
    if len(segments) == 1 and segments[0][0] == "text" and _is_scalar_word(source):
        return _Const(source, _scalar(source))
    return _Lookup(source, _parse_path(segments, depth), None)


def _parse_format(text: str, source: str, depth: int) -> _Format:
    pieces: list[str | Node] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "`":
            end = text.find("`", i + 1)  # the caller checked that backticks are closed
            literal.append(text[i + 1 : end])
            i = end + 1
        elif char == "{" and text.startswith("{", i + 1):
            literal.append("{")
            i += 2
        elif char == "{":
            end = _placeholder_end(text, i + 1)
            if literal:
                pieces.append("".join(literal))
                literal = []
            pieces.append(_parse_placeholder(text[i + 1 : end], depth + 1))
            i = end + 1
        elif char == "}":
            if not text.startswith("}", i + 1):
                raise errors.ValidationError("single '}' in !f text; write '}}' for a brace")
            literal.append("}")
            i += 2
        else:
            literal.append(char)
            i += 1
    if literal:
        pieces.append("".join(literal))
    return _Format(source, tuple(pieces))


def _parse_placeholder(body: str, depth: int) -> Node:
    _check_depth(depth)
    return _parse_body(body, "{" + body + "}", depth)


def _placeholder_end(text: str, start: int) -> int:
    i = start
    while i < len(text):
        char = text[i]
        if char == "}":
            return i
        if char == "{":
            raise errors.ValidationError("'{' inside a !f placeholder; use a nested [!f:...]")
        if char == "[":
            i = _group_end(text, i)
        elif char == "`":
            i = text.find("`", i + 1) + 1
        else:
            i += 1
    raise errors.ValidationError("unclosed '{' in !f text; write '{{' for a brace")


class _ExpressionParser:
    """Recursive descent over the tokens of an ``!e:`` expression.

    Precedence, lowest first: ``or``, ``and``, ``not``, comparisons (not chained), ``+ -``,
    ``* / %``, unary ``- +``, atoms (literals, paths, ``[templates]``, parentheses).
    """

    def __init__(self, text: str, depth: int) -> None:
        self.tokens = _tokenize(text, depth)
        self.pos = 0

    def parse(self) -> Node:
        if not self.tokens:
            raise errors.ValidationError("empty expression")
        node = self._or(0)
        if self.pos < len(self.tokens):
            raise self._unexpected()
        return node

    def _peek(self) -> str | Node | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _describe(self) -> str:
        token = self._peek()
        if token is None:
            return "the end of the expression"
        return repr(token) if isinstance(token, str) else _source(token)

    def _unexpected(self) -> errors.ValidationError:
        return errors.ValidationError(f"unexpected {self._describe()} in expression")

    def _take(self, *ops: str) -> str | None:
        token = self._peek()
        if isinstance(token, str) and token in ops:
            self.pos += 1
            return token
        return None

    def _or(self, depth: int) -> Node:
        node = self._and(depth)
        while op := self._take("or"):
            node = _Binary(op, node, self._and(depth))
        return node

    def _and(self, depth: int) -> Node:
        node = self._not(depth)
        while op := self._take("and"):
            node = _Binary(op, node, self._not(depth))
        return node

    def _not(self, depth: int) -> Node:
        if op := self._take("not"):
            _check_depth(depth + 1)
            return _Unary(op, self._not(depth + 1))
        return self._comparison(depth)

    def _comparison(self, depth: int) -> Node:
        node = self._sum(depth)
        if op := self._take(*_COMPARISONS):
            node = _Binary(op, node, self._sum(depth))
            if self._take(*_COMPARISONS):
                raise errors.ValidationError("comparisons cannot be chained; use 'and'")
        return node

    def _sum(self, depth: int) -> Node:
        node = self._product(depth)
        while op := self._take("+", "-"):
            node = _Binary(op, node, self._product(depth))
        return node

    def _product(self, depth: int) -> Node:
        node = self._unary(depth)
        while op := self._take("*", "/", "%"):
            node = _Binary(op, node, self._unary(depth))
        return node

    def _unary(self, depth: int) -> Node:
        if op := self._take("-", "+"):
            _check_depth(depth + 1)
            return _Unary(op, self._unary(depth + 1))
        return self._atom(depth)

    def _atom(self, depth: int) -> Node:
        token = self._peek()
        if isinstance(token, Node):
            self.pos += 1
            return token
        if self._take("("):
            _check_depth(depth + 1)
            node = self._or(depth + 1)
            if not self._take(")"):
                raise errors.ValidationError(f"expected ')' but found {self._describe()}")
            return node
        raise self._unexpected()


def _tokenize(text: str, depth: int) -> list[str | Node]:
    tokens: list[str | Node] = []
    bound = limits.active().expression_terms
    i = 0
    while i < len(text):
        if len(tokens) > bound:
            raise errors.ValidationError(
                f"expression has more than expression_terms ({bound}) operators and operands"
            )
        char = text[i]
        if char.isspace():
            i += 1
        elif char == "[":
            end = _group_end(text, i)
            tokens.append(_parse_group(text[i:end], depth + 1))
            i = end
        elif char == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise errors.ValidationError("unterminated backtick string")
            tokens.append(_Const(text[i : end + 1], text[i + 1 : end]))
            i = end + 1
        elif text[i : i + 2] in _COMPARISONS:
            tokens.append(text[i : i + 2])
            i += 2
        elif char in "<>()+-*/%":
            tokens.append(char)
            i += 1
        elif match := _WORD_RE.match(text, i):
            tokens.append(_word(match.group()))
            i = match.end()
        else:
            raise errors.ValidationError(f"unexpected character {char!r} in expression")
    return tokens


def _word(word: str) -> str | Node:
    if word in _KEYWORDS:
        return word
    if word in ("true", "false", "null"):
        return _Const(word, _scalar(word))
    if _EXPR_NUMBER_RE.fullmatch(word):
        if len(word) > _MAX_NUMBER_CHARS:
            raise errors.ValidationError(f"number {word[:20]}... is too long")
        return _Const(word, float(word) if "." in word else int(word))
    parts = tuple(word.split("."))
    if "" in parts:
        raise errors.ValidationError(f"path {shown(word)} has an empty key")
    return _Lookup(word, _PathSpec(word, (word,), parts), None)


# --- evaluation helpers -------------------------------------------------------------------------


def _source(node: Node) -> str:
    return str(getattr(node, "source", "?"))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if _is_number(value):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def _to_text(value: Any, budget: Budget | None = None) -> str:
    if isinstance(value, str):
        return value
    bound = limits.active().rendered_bytes
    size = json_size(value, bound, budget)
    if size > bound:
        raise errors.ValidationError(_too_large("formatted", size))
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError) as exc:
        raise errors.ValidationError(f"cannot format {_type_name(value)} as text: {exc}") from exc


def _too_large(what: str, size: int) -> str:
    bound = limits.active().rendered_bytes
    return (
        f"{what} value is larger than rendered_bytes ({limits.describe(bound)}):"
        f" at least {size:,} bytes"
    )


def _check_size(size: int, budget: Budget, added: int) -> None:
    """Charge ``added`` characters; refuse a value whose total ``size`` is too large."""
    budget.chars(added)
    if size > limits.active().rendered_bytes:
        raise errors.ValidationError(_too_large("rendered", size))


def _arithmetic(op: str, left: Any, right: Any, budget: Budget | None = None) -> Any:
    if op == "+" and isinstance(left, str) and isinstance(right, str):
        _check_size(len(left) + len(right), budget or Budget(), len(left) + len(right))
        return left + right
    if op == "+" and isinstance(left, list) and isinstance(right, list):
        bound = limits.active().rendered_bytes
        size = json_size(left, bound, budget) + json_size(right, bound, budget)
        if size > bound:
            raise errors.ValidationError(_too_large("rendered", size))
        return left + right
    if not (_is_number(left) and _is_number(right)):
        raise errors.ValidationError(
            f"{op!r} needs numbers, got {_type_name(left)} and {_type_name(right)}"
        )
    try:
        if op == "+":
            result = left + right
        elif op == "-":
            result = left - right
        elif op == "*":
            result = left * right
        elif op == "/":
            result = left / right
        else:
            result = left % right
    except ZeroDivisionError as exc:
        raise errors.ValidationError(f"division by zero in {op!r}") from exc
    except OverflowError as exc:
        raise errors.ValidationError(f"number too large in {op!r}") from exc
    if isinstance(result, int) and result.bit_length() > _MAX_INT_BITS:
        raise errors.ValidationError(f"integer result of {op!r} is too large")
    return result


def _now(ctx: _Context) -> datetime:
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
        raise errors.ValidationError(f"{shown(text)} is not an ISO-8601 date and time") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _need(value: Any, kinds: type | tuple[type, ...], what: str, name: str) -> Any:
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        raise errors.ValidationError(f"{name}() needs {what}, got {_type_name(value)}")
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _fn_len(ctx: _Context, args: list[Any]) -> Any:
    return len(_need(args[0], (str, list, tuple, dict), "a string, list or object", "len"))


def _fn_int(ctx: _Context, args: list[Any]) -> Any:
    value = _need(args[0], (int, float, str, bool), "a number or a string", "int")
    if isinstance(value, str) and len(value) > _MAX_NUMBER_CHARS:
        raise errors.ValidationError("int() got a string that is too long")
    return int(value)


def _fn_float(ctx: _Context, args: list[Any]) -> Any:
    value = _need(args[0], (int, float, str, bool), "a number or a string", "float")
    if isinstance(value, str) and len(value) > _MAX_NUMBER_CHARS:
        raise errors.ValidationError("float() got a string that is too long")
    result = float(value)
    if not math.isfinite(result):
        raise errors.ValidationError("float() result is not a finite number")
    return result


def _numbers(values: Any, name: str, budget: Budget) -> list[Any]:
    items = list(_need(values, (list, tuple), "a list", name))
    budget.charge(len(items))
    for item in items:
        _need(item, (int, float), "a list of numbers", name)
    return items


def _fn_sum(ctx: _Context, args: list[Any]) -> Any:
    return sum(_numbers(args[0], "sum", ctx.budget))


def _extreme(args: list[Any], name: str, pick: Callable[[list[Any]], Any], budget: Budget) -> Any:
    items = list(args[0]) if len(args) == 1 and isinstance(args[0], list | tuple) else args
    budget.charge(len(items))
    if items and isinstance(items[0], str):
        budget.chars(sum(len(x) for x in items if isinstance(x, str)))
    if not items:
        raise errors.ValidationError(f"{name}() of an empty list")
    if not all(_is_number(x) for x in items) and not all(isinstance(x, str) for x in items):
        raise errors.ValidationError(f"{name}() needs all numbers or all strings")
    return pick(items)


def _fn_min(ctx: _Context, args: list[Any]) -> Any:
    return _extreme(args, "min", min, ctx.budget)


def _fn_max(ctx: _Context, args: list[Any]) -> Any:
    return _extreme(args, "max", max, ctx.budget)


def _fn_first(ctx: _Context, args: list[Any]) -> Any:
    items = _need(args[0], (list, tuple), "a list", "first")
    return items[0] if items else None


def _fn_last(ctx: _Context, args: list[Any]) -> Any:
    items = _need(args[0], (list, tuple), "a list", "last")
    return items[-1] if items else None


def _fn_upper(ctx: _Context, args: list[Any]) -> Any:
    text = _need(args[0], str, "a string", "upper")
    _charge_case(ctx.budget, text)
    return text.upper()


def _fn_lower(ctx: _Context, args: list[Any]) -> Any:
    text = _need(args[0], str, "a string", "lower")
    _charge_case(ctx.budget, text)
    return text.lower()


def _charge_case(budget: Budget, text: str) -> None:
    # Mapping the case of non-ASCII text looks every character up: about 30 times the cost of
    # copying it (ASCII is mapped at copying speed).
    budget.chars(len(text) if text.isascii() else len(text) * 32)


def _fn_join(ctx: _Context, args: list[Any]) -> Any:
    separator = _need(args[0], str, "a string separator", "join")
    texts = []
    size = 0
    for item in _need(args[1], (list, tuple), "a list", "join"):
        text = _to_text(item, ctx.budget)
        size += len(text) + len(separator)
        _check_size(size, ctx.budget, len(text) + len(separator))
        texts.append(text)
    return separator.join(texts)


def _fn_split(ctx: _Context, args: list[Any]) -> Any:
    separator = _need(args[0], str, "a string separator", "split")
    if not separator:
        raise errors.ValidationError("split() needs a non-empty separator")
    text = _need(args[1], str, "a string", "split")
    ctx.budget.chars(len(text))
    parts = text.count(separator) + 1
    ctx.budget.charge(parts)
    _check_size(len(text) + 3 * parts, ctx.budget, 0)
    return text.split(separator)


def _fn_abs(ctx: _Context, args: list[Any]) -> Any:
    return abs(_need(args[0], (int, float), "a number", "abs"))


def _fn_round(ctx: _Context, args: list[Any]) -> Any:
    value = _need(args[0], (int, float), "a number", "round")
    if len(args) == 1:
        return round(value)
    digits = _need(args[1], int, "an integer number of digits", "round")
    return round(value, max(-400, min(400, digits)))


def _fn_str(ctx: _Context, args: list[Any]) -> Any:
    return _to_text(args[0], ctx.budget)


def _fn_bool(ctx: _Context, args: list[Any]) -> Any:
    return bool(args[0])


def _fn_not(ctx: _Context, args: list[Any]) -> Any:
    return not args[0]


def _fn_keys(ctx: _Context, args: list[Any]) -> Any:
    mapping = _need(args[0], Mapping, "an object", "keys")
    ctx.budget.charge(len(mapping))
    return list(mapping.keys())


def _fn_values(ctx: _Context, args: list[Any]) -> Any:
    mapping = _need(args[0], Mapping, "an object", "values")
    ctx.budget.charge(len(mapping))
    return list(mapping.values())


def _fn_default(ctx: _Context, args: list[Any]) -> Any:
    return args[1] if args[0] is None else args[0]


def _fn_now(ctx: _Context, args: list[Any]) -> Any:
    return _now(ctx).isoformat()


def _fn_timestamp(ctx: _Context, args: list[Any]) -> Any:
    moment = (
        _now(ctx) if not args else _parse_datetime(_need(args[0], str, "a string", "timestamp"))
    )
    return math.floor(moment.timestamp())


def _fn_uuid4(ctx: _Context, args: list[Any]) -> Any:
    return str(uuid.uuid4())


_FUNCTIONS: Final[Mapping[str, _Function]] = {
    "len": _Function(_fn_len, 1, 1),
    "int": _Function(_fn_int, 1, 1),
    "float": _Function(_fn_float, 1, 1),
    "str": _Function(_fn_str, 1, 1),
    "bool": _Function(_fn_bool, 1, 1),
    "not": _Function(_fn_not, 1, 1),
    "sum": _Function(_fn_sum, 1, 1),
    "min": _Function(_fn_min, 1, None),
    "max": _Function(_fn_max, 1, None),
    "first": _Function(_fn_first, 1, 1),
    "last": _Function(_fn_last, 1, 1),
    "upper": _Function(_fn_upper, 1, 1),
    "lower": _Function(_fn_lower, 1, 1),
    "join": _Function(_fn_join, 2, 2),
    "split": _Function(_fn_split, 2, 2),
    "abs": _Function(_fn_abs, 1, 1),
    "round": _Function(_fn_round, 1, 2),
    "keys": _Function(_fn_keys, 1, 1),
    "values": _Function(_fn_values, 1, 1),
    "default": _Function(_fn_default, 2, 2, lenient_first=True),
    "now": _Function(_fn_now, 0, 0),
    "timestamp": _Function(_fn_timestamp, 0, 1),
    "uuid4": _Function(_fn_uuid4, 0, 0),
}


# --- walking values -----------------------------------------------------------------------------


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


def _check_value_depth(depth: int, where: Where) -> None:
    bound = limits.active().value_depth
    if depth > bound:
        raise errors.ValidationError(
            f"nested deeper than value_depth ({bound} levels)", field=field_name(where)
        )


def _validate(value: Any, where: Where, depth: int) -> None:
    _check_value_depth(depth, where)
    if isinstance(value, str):
        if is_template(value):
            try:
                parse(value)
            except errors.ValidationError as exc:
                raise errors.ValidationError(exc.message, field=field_name(where)) from exc
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _validate(item, (where, key), depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _validate(item, (where, index), depth + 1)


def _render(value: Any, ctx: _Context, where: Where, depth: int) -> Any:
    _check_value_depth(depth, where)
    if isinstance(value, str):
        if is_literal(value):
            return value[1:-1]
        if not is_template(value):
            return value
        try:
            node = parse(value)
        except errors.ValidationError as exc:
            raise errors.ValidationError(exc.message, field=field_name(where)) from exc
        try:
            return _evaluate_node(node, ctx)
        except errors.ValidationError as exc:
            raise errors.ValidationError(
                f"template {shown(value)}: {exc.message}", field=field_name(where)
            ) from exc
    if isinstance(value, Mapping):
        return {key: _render(item, ctx, (where, key), depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_render(item, ctx, (where, i), depth + 1) for i, item in enumerate(value)]
    return value
