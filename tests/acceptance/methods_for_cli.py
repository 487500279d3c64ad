"""Methods the CLI acceptance tests load with ``--methods tests.acceptance.methods_for_cli``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kaiju_tasks.methods import Methods

methods = Methods()


@methods.register("cli.slow")
async def slow(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "slept"


@methods.register("cli.hold")
async def hold(path: str) -> str:
    """Run until the file ``path`` exists: the test decides when the stage ends."""
    # A file the test process creates, polled: the simplest signal across processes.
    while not Path(path).exists():  # noqa: ASYNC110, ASYNC240 - a stat of a local file
        await asyncio.sleep(0.05)
    return "released"
