"""Stage methods the hostile-input tests load with ``--methods``."""

from __future__ import annotations

from typing import Any

from kaiju_tasks.methods import Methods

methods = Methods()


@methods.register("sec.echo")
async def echo(text: Any = None) -> Any:
    return text


@methods.register("sec.fail")
async def fail(size: int) -> Any:
    raise ValueError("x" * size)
