"""Pausing the cyclic garbage collector over the synchronous loops of bulk creates."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused(pause: bool = True) -> Iterator[None]:
    """Pause the cyclic garbage collector over a synchronous loop (no await inside).

    A bulk create allocates several objects per task that all stay alive until it returns, so
    the collections they trigger free nothing, yet each full one walks the whole heap: with
    10,000 tasks they cost as much as building the rows. Reference counting still frees
    everything else at once; a collection the pause put off runs at the next allocations.
    """
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
