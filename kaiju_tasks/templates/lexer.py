"""Template tokenizer: reads the text of a template before it is parsed (pure).

Splits template text into plain runs, ``[...]`` groups and backtick-quoted strings
(``scan``), splits those on ``:`` outside groups and quotes (``split_colons``), finds where a
group or an ``!f`` placeholder ends, reads bare JSON scalar literals (``scalar``), and measures
and bounds how deep groups nest (``nesting``, ``check_depth``). It recognises a template
(``is_template``) and a backtick literal (``is_literal``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final, TypeAlias

from kaiju_tasks import errors, limits

MAX_NUMBER_CHARS: Final = 400  # longer numeric literals are refused before int()/float()


_JSON_NUMBER_RE: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


Segment: TypeAlias = tuple[str, str]  # (kind, raw text); kind is "text", "group" or "quoted"


def is_template(value: object) -> bool:
    """Whether ``value`` is a template string: it starts with ``[`` and ends with ``]``."""
    return isinstance(value, str) and len(value) >= 2 and value[0] == "[" and value[-1] == "]"


def is_literal(value: object) -> bool:
    """Whether ``value`` is a backtick-quoted literal string (rendered without its backticks)."""
    return isinstance(value, str) and len(value) >= 2 and value[0] == "`" and value[-1] == "`"


_BRACKETS: Final = re.compile(r"[\[\]`]")


def nesting(template: str) -> int:
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


def check_depth(depth: int) -> None:
    """Refuse a group nested ``depth`` levels deep when that is past ``template_nesting``."""
    bound = limits.active().template_nesting
    if depth > bound:
        raise errors.ValidationError(
            f"nested too deeply (more than template_nesting, {bound} levels)"
        )


def group_end(text: str, start: int) -> int:
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


def scan(text: str) -> list[Segment]:
    """Split text into plain runs, ``[...]`` groups and backtick-quoted strings."""
    segments: list[Segment] = []
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
            end = group_end(text, i)
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


def split_colons(segments: list[Segment], maxsplit: int = -1) -> list[list[Segment]]:
    """Split segments on ``:`` in plain runs (never inside groups or quotes)."""
    out: list[list[Segment]] = [[]]
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


def text_of(segments: list[Segment]) -> str:
    """The text ``segments`` were read from."""
    return "".join(raw for _, raw in segments)


def placeholder_end(text: str, start: int) -> int:
    """Return the index of the ``}`` that closes the ``!f`` placeholder opened before ``start``."""
    i = start
    while i < len(text):
        char = text[i]
        if char == "}":
            return i
        if char == "{":
            raise errors.ValidationError("'{' inside a !f placeholder; use a nested [!f:...]")
        if char == "[":
            i = group_end(text, i)
        elif char == "`":
            i = text.find("`", i + 1) + 1
        else:
            i += 1
    raise errors.ValidationError("unclosed '{' in !f text; write '{{' for a brace")


def scalar(text: str) -> Any:
    """Read a bare literal as a JSON scalar, or keep it as a string."""
    if text in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[text]
    if len(text) <= MAX_NUMBER_CHARS and _JSON_NUMBER_RE.fullmatch(text):
        number = json.loads(text)
        if not isinstance(number, float) or math.isfinite(number):
            return number
    return text


def is_scalar_word(text: str) -> bool:
    """Whether ``text`` reads as a JSON scalar literal (``true``, ``false``, ``null``, a number)."""
    return text in ("true", "false", "null") or bool(_JSON_NUMBER_RE.fullmatch(text))
