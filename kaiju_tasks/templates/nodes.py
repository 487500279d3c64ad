"""Template evaluator: the nodes a template parses into, and how each evaluates (pure).

``parser`` builds a tree of ``Node`` objects: constants, path lookups with defaults, ``!x``
calls, ``!f`` text, and the unary and binary operators of ``!e`` expressions. Each node
evaluates itself against a ``Context`` (the data, the time, the work ``Budget`` left), charging
the budget as it goes and refusing results larger than ``[limits] rendered_bytes``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

from kaiju_tasks import errors, limits, values
from kaiju_tasks.templates import paths

_MAX_INT_BITS: Final = 1024  # an !e result beyond this is refused: it would not be useful JSON


COMPARISONS: Final = frozenset({"==", "!=", "<", ">", "<=", ">="})


class Context:
    """What a rendering reads (the data, the time) and the work it may still do."""

    __slots__ = ("budget", "data", "now", "rendered")

    def __init__(
        self, data: Mapping[str, Any], now: datetime | None, budget: values.Budget
    ) -> None:
        self.data = data
        self.now = now
        self.budget = budget
        self.rendered = False  # a template was evaluated: the result may outgrow the input


class Node(abc.ABC):
    """A parsed template, as returned by ``parse``."""

    __slots__ = ()

    def render(
        self,
        data: Mapping[str, Any],
        *,
        now: datetime | None = None,
        budget: values.Budget | None = None,
    ) -> Any:
        """Evaluate the template against ``data`` (raises errors.ValidationError on failure)."""
        ctx = Context(data, now, budget or values.Budget())
        value = evaluate_node(self, ctx)
        size = values.json_size(value, limits.active().rendered_bytes, ctx.budget)
        if size > limits.active().rendered_bytes:
            raise errors.ValidationError(too_large("rendered", size))
        return value

    @abc.abstractmethod
    def _eval(self, ctx: Context) -> Any: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Const(Node):
    """A literal value: a default, a quoted string or a scalar."""

    source: str
    value: Any

    def _eval(self, ctx: Context) -> Any:
        return self.value


@dataclasses.dataclass(frozen=True, slots=True)
class PathSpec:
    """A path; ``parts`` is set when it has no nested templates."""

    source: str
    pieces: tuple[str | Node, ...]
    parts: tuple[str, ...] | None

    def resolve(self, ctx: Context) -> tuple[str, ...]:
        """The keys of the path, its nested templates rendered and spliced in."""
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
                    f"nested template {values.shown(source_of(piece))} must render to a string,"
                    f" got {values.type_name(value)}"
                )
        path = "".join(text)
        parts = tuple(path.split("."))
        if "" in parts:
            raise errors.ValidationError(f"path {values.shown(path)} has an empty key")
        return parts


@dataclasses.dataclass(frozen=True, slots=True)
class Lookup(Node):
    """``[path]`` or ``[path:default]``: a value looked up in the data."""

    source: str
    path: PathSpec
    default: Node | None

    def _eval(self, ctx: Context) -> Any:
        ctx.budget.charge(1)
        if self.default is None:
            return paths.lookup_strict(ctx.data, self.path.resolve(ctx), ctx.budget)
        return self.lookup(ctx, functools.cache(functools.partial(self.default._eval, ctx)))

    def lookup(self, ctx: Context, fallback: paths.Fallback) -> Any:
        """Look the path up; ``fallback`` supplies missing or ``None`` values (or ``MISSING``)."""
        return paths.walk(ctx.data, self.path.resolve(ctx), 0, fallback, ctx.budget)


@dataclasses.dataclass(frozen=True, slots=True)
class Function:
    """An entry of the function whitelist: its code and how many arguments it takes."""

    impl: Callable[[Context, list[Any]], Any]
    min_args: int
    max_args: int | None
    lenient_first: bool = False  # the first argument may be a missing path (it is then None)


@dataclasses.dataclass(frozen=True, slots=True)
class Call(Node):
    """``[!x:name:arg:...]``: a call of a whitelisted function."""

    source: str
    name: str
    function: Function
    args: tuple[Node, ...]

    def _eval(self, ctx: Context) -> Any:
        arguments: list[Any] = []
        for index, arg in enumerate(self.args):
            if index == 0 and self.function.lenient_first and isinstance(arg, Lookup):
                value = arg.lookup(ctx, None)
                arguments.append(None if value is paths.MISSING else value)
            else:
                arguments.append(arg._eval(ctx))
        ctx.budget.charge(1)
        try:
            result = self.function.impl(ctx, arguments)
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise errors.ValidationError(f"!x:{self.name} failed: {exc}") from exc
        if isinstance(result, float) and not math.isfinite(result):
            raise errors.ValidationError(f"!x:{self.name} result is not a finite number")
        return result


@dataclasses.dataclass(frozen=True, slots=True)
class Format(Node):
    """``[!f:text]``: text with ``{...}`` placeholders replaced by their values."""

    source: str
    pieces: tuple[str | Node, ...]

    def _eval(self, ctx: Context) -> Any:
        texts = []
        size = 0
        for piece in self.pieces:
            text = piece if isinstance(piece, str) else to_text(piece._eval(ctx), ctx.budget)
            size += len(text)
            check_size(size, ctx.budget, len(text))
            texts.append(text)
        return "".join(texts)


@dataclasses.dataclass(frozen=True, slots=True)
class Unary(Node):
    """``not``, ``-`` or ``+`` applied to one operand of an ``!e`` expression."""

    source: str
    operand: Node

    def _eval(self, ctx: Context) -> Any:
        ctx.budget.charge(1)
        value = self.operand._eval(ctx)
        if self.source == "not":
            return not value
        if not values.is_number(value):
            raise errors.ValidationError(
                f"unary {self.source!r} needs a number, got {values.type_name(value)}"
            )
        return -value if self.source == "-" else value


@dataclasses.dataclass(frozen=True, slots=True)
class Binary(Node):
    """A binary operator of an ``!e`` expression (``source`` is the operator)."""

    source: str  # the operator
    left: Node
    right: Node

    def _eval(self, ctx: Context) -> Any:
        ctx.budget.charge(1)
        op = self.source
        if op == "and":
            return bool(self.left._eval(ctx)) and bool(self.right._eval(ctx))
        if op == "or":
            return bool(self.left._eval(ctx)) or bool(self.right._eval(ctx))
        left = self.left._eval(ctx)
        right = self.right._eval(ctx)
        if op == "==":
            return values.json_equal(left, right, ctx.budget)
        if op == "!=":
            return not values.json_equal(left, right, ctx.budget)
        if op in COMPARISONS:
            if isinstance(left, str):
                ctx.budget.chars(len(left))
            order = values.compare(left, right)
            if order is None:
                raise errors.ValidationError(
                    f"cannot compare {values.type_name(left)} and {values.type_name(right)}"
                    f" with {op!r}"
                )
            return {"<": order < 0, ">": order > 0, "<=": order <= 0, ">=": order >= 0}[op]
        return _arithmetic(op, left, right, ctx.budget)


@dataclasses.dataclass(frozen=True, slots=True)
class Expression(Node):
    """``[!e:expr]``: an expression, whose result must be a finite number if a number."""

    source: str
    root: Node

    def _eval(self, ctx: Context) -> Any:
        value = self.root._eval(ctx)
        if isinstance(value, float) and not math.isfinite(value):
            raise errors.ValidationError("expression result is not a finite number")
        return value


def evaluate_node(node: Node, ctx: Context) -> Any:
    """Evaluate a parsed template; a tree too deep for the stack is a ValidationError."""
    ctx.rendered = True
    try:
        return node._eval(ctx)
    except RecursionError:
        raise errors.ValidationError("nested too deeply to evaluate") from None


def children(node: Node | PathSpec) -> Sequence[Node | PathSpec]:
    """The nodes directly below ``node`` (nested templates, arguments, operands)."""
    if isinstance(node, Lookup):
        return (node.path,) if node.default is None else (node.path, node.default)
    if isinstance(node, PathSpec | Format):
        return [piece for piece in node.pieces if not isinstance(piece, str)]
    if isinstance(node, Call):
        return node.args
    if isinstance(node, Unary):
        return (node.operand,)
    if isinstance(node, Binary):
        return (node.left, node.right)
    if isinstance(node, Expression):
        return (node.root,)
    return ()


def source_of(node: Node) -> str:
    """The template text ``node`` was parsed from, for messages."""
    return str(getattr(node, "source", "?"))


def to_text(value: Any, budget: values.Budget | None = None) -> str:
    """``value`` as text: a string as is, anything else as JSON (bounded in size)."""
    if isinstance(value, str):
        return value
    bound = limits.active().rendered_bytes
    size = values.json_size(value, bound, budget)
    if size > bound:
        raise errors.ValidationError(too_large("formatted", size))
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError) as exc:
        raise errors.ValidationError(
            f"cannot format {values.type_name(value)} as text: {exc}"
        ) from exc


def too_large(what: str, size: int) -> str:
    """The message for a value past ``rendered_bytes``."""
    bound = limits.active().rendered_bytes
    return (
        f"{what} value is larger than rendered_bytes ({limits.describe(bound)}):"
        f" at least {size:,} bytes"
    )


def check_size(size: int, budget: values.Budget, added: int) -> None:
    """Charge ``added`` characters; refuse a value whose total ``size`` is too large."""
    budget.chars(added)
    if size > limits.active().rendered_bytes:
        raise errors.ValidationError(too_large("rendered", size))


def _arithmetic(op: str, left: Any, right: Any, budget: values.Budget | None = None) -> Any:
    if op == "+" and isinstance(left, str) and isinstance(right, str):
        check_size(len(left) + len(right), budget or values.Budget(), len(left) + len(right))
        return left + right
    if op == "+" and isinstance(left, list) and isinstance(right, list):
        bound = limits.active().rendered_bytes
        size = values.json_size(left, bound, budget) + values.json_size(right, bound, budget)
        if size > bound:
            raise errors.ValidationError(too_large("rendered", size))
        return left + right
    if not (values.is_number(left) and values.is_number(right)):
        raise errors.ValidationError(
            f"{op!r} needs numbers, got {values.type_name(left)} and {values.type_name(right)}"
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
