"""Pausing the cyclic garbage collector over a bulk create."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused(pause: bool = True) -> Iterator[None]:
    """Pause the cyclic garbage collector over a bulk create (a fraction of a second).

    A bulk create allocates several objects per task that all stay alive until it returns, so
    the collections they trigger free nothing, yet each full one walks the whole heap: with
    10,000 tasks they cost as much as building the rows. Pausing only its loops would merely
    put the collections off to the allocations right after, so the store keeps the pause over
    the awaits of a bulk write, from the moment it holds its connection (never over a wait for
    one): other coroutines meanwhile run without cyclic collection too, which defers it and
    loses nothing. Reference counting still frees everything else at once. A pause inside
    another leaves the collector as the outer one says.
    """
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
