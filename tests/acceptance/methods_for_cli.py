"""Methods the CLI acceptance tests load with ``--methods tests.acceptance.methods_for_cli``."""

from __future__ import annotations

import asyncio

from kaiju_tasks.methods import Methods

methods = Methods()


@methods.register("cli.slow")
async def slow(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"
