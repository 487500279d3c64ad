"""Template expressions: tokenizes and parses the ``[!e:...]`` language (pure).

An expression is split into tokens (operators, keywords, numbers, backtick strings, bare paths
and nested ``[templates]``, the latter parsed by the callback the parser passes in) and parsed by
recursive descent into ``nodes``. The number of tokens is bounded by ``[limits]
expression_terms`` and the nesting of parentheses and unary operators by ``template_nesting``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final

from kaiju_tasks import errors, limits, values
from kaiju_tasks.templates import lexer, nodes

_EXPR_NUMBER_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")


_WORD_RE: Final = re.compile(r"[\w.]+")


_KEYWORDS: Final = frozenset({"and", "or", "not"})

GroupParser = Callable[[str, int], nodes.Node]
"""Parses a nested ``[...]`` group found in an expression: ``(group text, depth) -> node``.

The parser passes its own, so this module need not import the parser that imports it.
"""


class ExpressionParser:
    """Recursive descent over the tokens of an ``!e:`` expression.

    Precedence, lowest first: ``or``, ``and``, ``not``, comparisons (not chained), ``+ -``,
    ``* / %``, unary ``- +``, atoms (literals, paths, ``[templates]``, parentheses).
    """

    def __init__(self, text: str, depth: int, parse_group: GroupParser) -> None:
        self.tokens = _tokenize(text, depth, parse_group)
        self.pos = 0

    def parse(self) -> nodes.Node:
        """Parse the whole expression; raise errors.ValidationError on a syntax error."""
        if not self.tokens:
            raise errors.ValidationError("empty expression")
        node = self._or(0)
        if self.pos < len(self.tokens):
            raise self._unexpected()
        return node

    def _peek(self) -> str | nodes.Node | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _describe(self) -> str:
        token = self._peek()
        if token is None:
            return "the end of the expression"
        return repr(token) if isinstance(token, str) else nodes.source_of(token)

    def _unexpected(self) -> errors.ValidationError:
        return errors.ValidationError(f"unexpected {self._describe()} in expression")

    def _take(self, *ops: str) -> str | None:
        token = self._peek()
        if isinstance(token, str) and token in ops:
            self.pos += 1
            return token
        return None

    def _or(self, depth: int) -> nodes.Node:
        node = self._and(depth)
        while op := self._take("or"):
            node = nodes.Binary(op, node, self._and(depth))
        return node

    def _and(self, depth: int) -> nodes.Node:
        node = self._not(depth)
        while op := self._take("and"):
            node = nodes.Binary(op, node, self._not(depth))
        return node

    def _not(self, depth: int) -> nodes.Node:
        if op := self._take("not"):
            lexer.check_depth(depth + 1)
            return nodes.Unary(op, self._not(depth + 1))
        return self._comparison(depth)

    def _comparison(self, depth: int) -> nodes.Node:
        node = self._sum(depth)
        if op := self._take(*nodes.COMPARISONS):
            node = nodes.Binary(op, node, self._sum(depth))
            if self._take(*nodes.COMPARISONS):
                raise errors.ValidationError("comparisons cannot be chained; use 'and'")
        return node

    def _sum(self, depth: int) -> nodes.Node:
        node = self._product(depth)
        while op := self._take("+", "-"):
            node = nodes.Binary(op, node, self._product(depth))
        return node

    def _product(self, depth: int) -> nodes.Node:
        node = self._unary(depth)
        while op := self._take("*", "/", "%"):
            node = nodes.Binary(op, node, self._unary(depth))
        return node

    def _unary(self, depth: int) -> nodes.Node:
        if op := self._take("-", "+"):
            lexer.check_depth(depth + 1)
            return nodes.Unary(op, self._unary(depth + 1))
        return self._atom(depth)

    def _atom(self, depth: int) -> nodes.Node:
        token = self._peek()
        if isinstance(token, nodes.Node):
            self.pos += 1
            return token
        if self._take("("):
            lexer.check_depth(depth + 1)
            node = self._or(depth + 1)
            if not self._take(")"):
                raise errors.ValidationError(f"expected ')' but found {self._describe()}")
            return node
        raise self._unexpected()


def _tokenize(text: str, depth: int, parse_group: GroupParser) -> list[str | nodes.Node]:
    tokens: list[str | nodes.Node] = []
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
            end = lexer.group_end(text, i)
            tokens.append(parse_group(text[i:end], depth + 1))
            i = end
        elif char == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise errors.ValidationError("unterminated backtick string")
            tokens.append(nodes.Const(text[i : end + 1], text[i + 1 : end]))
            i = end + 1
        elif text[i : i + 2] in nodes.COMPARISONS:
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


def _word(word: str) -> str | nodes.Node:
    if word in _KEYWORDS:
        return word
    if word in ("true", "false", "null"):
        return nodes.Const(word, lexer.scalar(word))
    if _EXPR_NUMBER_RE.fullmatch(word):
        if len(word) > lexer.MAX_NUMBER_CHARS:
            raise errors.ValidationError(f"number {word[:20]}... is too long")
        return nodes.Const(word, float(word) if "." in word else int(word))
    parts = tuple(word.split("."))
    if "" in parts:
        raise errors.ValidationError(f"path {values.shown(word)} has an empty key")
    return nodes.Lookup(word, nodes.PathSpec(word, (word,), parts), None)
