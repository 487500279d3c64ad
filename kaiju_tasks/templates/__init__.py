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

Nothing is ever ``eval``-ed: templates are parsed by the small parser of this package, and
parses are cached, so validating at create time and rendering in the executor parse each
template once.

The package, by part
    ``lexer`` (tokenizer: brackets, quotes, ``:`` parts, scalar literals), ``parser`` (templates
    into nodes, the parse bounds, the parse cache, ``parse_allowance``), ``expression`` (the
    ``!e`` tokenizer and parser), ``nodes`` (evaluator: each node's evaluation), ``paths`` (path
    lookup), ``functions`` (the ``!x`` whitelist) and ``walk`` (``validate``, ``render`` and
    ``stage_references`` over JSON values). The JSON value rules it shares with
    ``kaiju_tasks.conditions`` (``json_equal``, ``compare``, ``Budget``, ...) live in
    ``kaiju_tasks.values`` and are re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kaiju_tasks.templates import parser
from kaiju_tasks.templates.lexer import is_literal, is_template
from kaiju_tasks.templates.nodes import Node
from kaiju_tasks.templates.parser import MAX_NESTING, parse, parse_allowance
from kaiju_tasks.templates.paths import get_path
from kaiju_tasks.templates.walk import MAX_VALUE_DEPTH, render, stage_references, validate
from kaiju_tasks.values import (
    Budget,
    JSONLike,
    JSONValue,
    Where,
    compare,
    field_name,
    json_equal,
    json_size,
    shown,
)

if TYPE_CHECKING:
    from kaiju_tasks import conditions

    # At run time ``Condition`` comes from the module ``__getattr__`` below: the guide documents
    # ``kaiju_tasks.templates.Condition``, but conditions imports this package, so importing it
    # here eagerly would form a cycle.
    Condition = conditions.Condition

__all__ = [
    "MAX_NESTING",
    "MAX_VALUE_DEPTH",
    "Budget",
    "JSONLike",
    "JSONValue",
    "Node",
    "Where",
    "compare",
    "field_name",
    "get_path",
    "is_literal",
    "is_template",
    "json_equal",
    "json_size",
    "parse",
    "parse_allowance",
    "render",
    "shown",
    "stage_references",
    "validate",
]

_CACHE = parser.CACHE  # the parse cache, which tests clear and inspect


def __getattr__(name: str) -> Any:
    """Resolve ``Condition`` lazily: it lives in ``kaiju_tasks.conditions``, which imports us."""
    if name == "Condition":
        from kaiju_tasks import conditions

        return conditions.Condition
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
