"""Template parser: turns template text into ``nodes``, within bounds, with a cache (pure).

``parse`` reads one template (``[path:default]``, ``[!x:...]``, ``[!e:...]``, ``[!f:...]``)
into a tree of nodes. Before and after parsing it enforces the bounds on a template:
``[limits] template_chars`` characters, ``template_nesting`` levels, ``expression_terms``
arguments or terms, and a tree no taller than their sum, so evaluating it cannot exhaust the
stack. Parses are kept in an LRU cache bounded by ``template_cache_bytes``, and
``parse_allowance`` bounds the parse work one request may cause (``request_template_nodes``).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections import OrderedDict
from collections.abc import Iterator
from typing import Final

from kaiju_tasks import errors, limits, values
from kaiju_tasks.templates import expression, functions, lexer, nodes

MAX_NESTING: Final = limits.DEFAULT.template_nesting
"""Deepest nesting of templates, parentheses and unary operators inside one template (levels,
by default; ``[limits] template_nesting``)."""


_HELPERS: Final = ("!x:", "!e:", "!f:")


def parse(template: str) -> nodes.Node:
    """Parse a template string into a renderable node (cached).

    Args:
        template: a string that starts with ``[`` and ends with ``]``.

    Returns:
        The parsed template; render it with ``Node.render(data)``.

    Raises:
        errors.ValidationError: the string is not a template or is malformed.
    """
    if not lexer.is_template(template):
        raise errors.ValidationError(
            f"not a template: {values.shown(template)} must start with '[' and end with ']'"
        )
    node = CACHE.get(template)
    if node is None:
        node = _parse_uncached(template)
        CACHE.put(template, node)
    return node


class _ParseCache:
    """Parsed templates, least recently used first, bounded by the characters of their text.

    The bound is ``[limits] template_cache_bytes``; a template longer than a sixteenth of it is
    parsed each time rather than kept, so a few huge templates cannot push out the many small
    ones a pipeline reuses.
    """

    def __init__(self) -> None:
        self._nodes: OrderedDict[str, nodes.Node] = OrderedDict()
        self.size = 0

    def get(self, template: str) -> nodes.Node | None:
        node = self._nodes.get(template)
        if node is not None:
            self._nodes.move_to_end(template)
        return node

    def put(self, template: str, node: nodes.Node) -> None:
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


CACHE: Final = _ParseCache()


def _parse_uncached(template: str) -> nodes.Node:
    bound = limits.active().template_chars
    if len(template) > bound:
        raise errors.ValidationError(
            f"template is {len(template):,} characters, more than template_chars ({bound:,})"
        )
    # The parser reads a group's text once per level it is nested in: bound the product.
    deepest = lexer.nesting(template)
    if len(template) * deepest > 4 * bound:
        raise errors.ValidationError(
            f"template is too complex to parse: {len(template):,} characters nested {deepest}"
            f" levels (characters times levels at most 4 x template_chars, {4 * bound:,})"
        )
    try:
        body = template[1:-1]
        lexer.scan(body)  # the outer brackets must enclose one balanced group
        node = _parse_body(body, template, 1)
        count = _check_height(node)
    except errors.ValidationError as exc:
        raise errors.ValidationError(
            f"invalid template {values.shown(template)}: {exc.message}"
        ) from exc
    except RecursionError:
        raise errors.ValidationError(
            f"invalid template {values.shown(template)}: nested too deeply"
        ) from None
    _charge_parse(count)
    return node


def _check_height(root: nodes.Node) -> int:
    """Refuse a parsed template whose evaluation would recurse too deeply; return its nodes.

    Each expression's length is bounded as it is tokenized; this bounds the whole tree, where
    expressions nest inside one another: at most ``template_nesting + expression_terms`` nodes
    on any path from the root, so evaluating it never exhausts the interpreter's stack.
    """
    bound = limits.active()
    height_bound = bound.template_nesting + bound.expression_terms
    stack: list[tuple[nodes.Node | nodes.PathSpec, int]] = [(root, 1)]
    count = 0
    while stack:
        node, height = stack.pop()
        count += 1
        if height > height_bound:
            raise errors.ValidationError(
                f"nested too deeply: more than {height_bound} levels of operations"
                " (template_nesting + expression_terms)"
            )
        stack.extend((child, height + 1) for child in nodes.children(node))
    return count


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


def _charge_parse(count: int) -> None:
    allowance = _ALLOWANCE.get()
    if allowance is None:
        return
    allowance.left -= count
    if allowance.left < 0:
        raise errors.ValidationError(
            f"the templates of this request take more than request_template_nodes"
            f" ({allowance.limit:,} nodes) to parse: send fewer or simpler templates per request"
        )


def _parse_group(raw: str, depth: int) -> nodes.Node:
    """Parse a nested ``[...]`` group (already known to be balanced)."""
    lexer.check_depth(depth)
    return _parse_body(raw[1:-1], raw, depth)


def _parse_body(body: str, source: str, depth: int) -> nodes.Node:
    if body.startswith("!"):
        kind = body[:3]
        if kind not in _HELPERS:
            raise errors.ValidationError(
                f"unknown helper {values.shown(body[:2])}: expected '!x:', '!e:' or '!f:'"
            )
        if kind == "!x:":
            return _parse_call(body[3:], source, depth)
        if kind == "!e:":
            return nodes.Expression(
                source, expression.ExpressionParser(body[3:], depth, _parse_group).parse()
            )
        return _parse_format(body[3:], source, depth)
    parts = lexer.split_colons(lexer.scan(body), maxsplit=1)
    path = _parse_path(parts[0], depth)
    default = _parse_default(parts[1], depth) if len(parts) > 1 else None
    return nodes.Lookup(source, path, default)


def _parse_path(segments: list[lexer.Segment], depth: int) -> nodes.PathSpec:
    if not segments:
        raise errors.ValidationError("empty path")
    pieces: list[str | nodes.Node] = []
    for kind, raw in segments:
        if kind == "quoted":
            raise errors.ValidationError(f"backtick-quoted text is not allowed in a path: {raw}")
        pieces.append(_parse_group(raw, depth + 1) if kind == "group" else raw)
    source = lexer.text_of(segments)
    if all(isinstance(piece, str) for piece in pieces):
        parts = tuple(source.split("."))
        if "" in parts:
            raise errors.ValidationError(f"path {values.shown(source)} has an empty key")
        return nodes.PathSpec(source, tuple(pieces), parts)
    return nodes.PathSpec(source, tuple(pieces), None)


def _parse_default(segments: list[lexer.Segment], depth: int) -> nodes.Node:
    source = lexer.text_of(segments)
    if not segments:
        return nodes.Const(source, "")
    if len(segments) == 1 and segments[0][0] == "quoted":
        return nodes.Const(source, source[1:-1])
    if len(segments) == 1 and segments[0][0] == "group":
        return _parse_group(source, depth + 1)
    if any(kind != "text" for kind, _ in segments):
        raise errors.ValidationError(
            f"invalid default {values.shown(source)}: a default is a literal, one `quoted` string"
            " or one [template]"
        )
    return nodes.Const(source, lexer.scalar(source))


def _parse_call(text: str, source: str, depth: int) -> nodes.Call:
    parts = lexer.split_colons(lexer.scan(text))
    name_segments = parts[0]
    if len(name_segments) != 1 or name_segments[0][0] != "text":
        raise errors.ValidationError(
            f"!x needs a function name, got {values.shown(lexer.text_of(name_segments))}"
        )
    name = name_segments[0][1]
    function = functions.FUNCTIONS.get(name)
    if function is None:
        raise errors.ValidationError(
            f"unknown function {values.shown(name)} in !x"
            f" (known: {', '.join(sorted(functions.FUNCTIONS))})"
        )
    if len(parts) - 1 > limits.active().expression_terms:
        raise errors.ValidationError(
            f"function {values.shown(name)} has more than expression_terms"
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
    return nodes.Call(source, name, function, args)


def _parse_arg(segments: list[lexer.Segment], depth: int) -> nodes.Node:
    source = lexer.text_of(segments)
    if not segments:
        raise errors.ValidationError("empty argument in !x (arguments are separated by ':')")
    if len(segments) == 1 and segments[0][0] == "quoted":
        return nodes.Const(source, source[1:-1])
    if len(segments) == 1 and segments[0][0] == "group":
        return _parse_group(source, depth + 1)
    if len(segments) == 1 and segments[0][0] == "text" and lexer.is_scalar_word(source):
        return nodes.Const(source, lexer.scalar(source))
    return nodes.Lookup(source, _parse_path(segments, depth), None)


def _parse_format(text: str, source: str, depth: int) -> nodes.Format:
    pieces: list[str | nodes.Node] = []
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
            end = lexer.placeholder_end(text, i + 1)
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
    return nodes.Format(source, tuple(pieces))


def _parse_placeholder(body: str, depth: int) -> nodes.Node:
    lexer.check_depth(depth)
    return _parse_body(body, "{" + body + "}", depth)
