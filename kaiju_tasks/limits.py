"""Every bound on user-controlled input, in one place (pure).

A task manager runs other people's pipelines: whatever a token holder sends (a request, a
template, a condition, a pattern) and whatever a stage answers must cost a bounded amount of
memory and time. Each limit below is enforced at the boundary where the value first appears, before
the bytes it would produce exist, and a value over a limit is refused with an error naming the
field and the limit (a JSON-RPC -32602 for a request; a failed stage for a stage).

The defaults fit ordinary pipelines with a wide margin. They are set in the ``[limits]`` section
of the configuration (``KAIJU_TASKS_LIMITS_<NAME>``); each process applies its own at start-up
with :func:`configure`. docs/configuration.md lists them with their units, and docs/security.md
says what each one protects.

The HTTP request limits (body size, batch length, per-call time, read timeouts) live in
``[server]``, next to the listener they bound.
"""

from __future__ import annotations

import dataclasses
from typing import Final

KIB: Final = 1024
MIB: Final = 1024 * KIB


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """The bounds applied by this process (see the module docstring)."""

    template_chars: int = 16 * KIB
    """Longest template string accepted in a task's method, params or condition (characters)."""
    request_template_nodes: int = 10_000
    """Most parse work one API call may cause: nodes of the templates it holds that were not
    parsed before (a path, a call, an operator or a text piece is one node)."""
    rendered_bytes: int = 1 * MIB
    """Largest value one template may render to, and the rendered params of one stage (bytes of
    JSON); enforced while rendering, so an oversized value is never built."""
    expression_terms: int = 256
    """Most operators and operands in one ``!e:`` expression."""
    template_nesting: int = 32
    """Deepest nesting of template groups, calls and expression parentheses (levels)."""
    eval_steps: int = 100_000
    """Most work one rendering of a stage's templates, or one evaluation of a condition, may do
    (steps: a step is about one node evaluated, one value visited, 1,024 characters copied or
    compared, or 40 characters matched by a pattern)."""
    value_depth: int = 200
    """Deepest nesting of JSON values (params, kws, a stage result) (levels)."""
    condition_depth: int = 32
    """Deepest nesting of a stage condition or a list filter (objects, lists and ``not``)."""
    condition_values: int = 10_000
    """Most values in one ``tasks.list`` filter (list items and operands, all added up)."""
    pattern_chars: int = 256
    """Longest ``match`` or ``like`` pattern (characters)."""
    regex_memory: int = 1 * MIB
    """Most memory one compiled ``match`` pattern may take (bytes, RE2's ``max_mem``)."""
    stage_result_bytes: int = 1 * MIB
    """Largest result one stage may return (bytes of JSON); a remote reply is read no further."""
    task_result_bytes: int = 4 * MIB
    """Largest total of a task's stage results (bytes of JSON)."""
    reply_bytes: int = 16 * MIB
    """Largest JSON-RPC reply of the HTTP API (bytes), all the replies of a batch together."""
    template_cache_bytes: int = 256 * KIB
    """Memory for parsed templates kept between uses (bytes of template text)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"limit {field.name} must be a positive integer, got {value!r}")


DEFAULT: Final = Limits()
"""The limits in force when nothing is configured."""

_active: Limits = DEFAULT


def active() -> Limits:
    """The limits this process applies."""
    return _active


def configure(limits: Limits) -> None:
    """Apply ``limits`` to this process (at start-up, before serving)."""
    global _active  # one process-wide setting, read on every bounded operation
    _active = limits


def describe(size: int) -> str:
    """A byte count for messages: ``1 MiB``, ``16 KiB``, ``300 bytes``."""
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    if size >= KIB and size % KIB == 0:
        return f"{size // KIB} KiB"
    return f"{size:,} bytes"
