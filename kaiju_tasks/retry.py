"""Retry back-off: when a failed run that will be retried after a delay runs again. Pure.

A task whose run fails with retries left (``max_retries``) and a retryable error is queued
again at once when its ``retry_delay`` is 0, or waits IDLE until :func:`next_attempt_at`:
``retry_delay * 2**retries`` seconds after the failure, ``retries`` being the retries made
before this one (so 1x, 2x, 4x, ... the delay). A disabled task waits too, for ``retry_delay``
grown the same way (at once when it is 0) and until it is enabled again.
"""

from __future__ import annotations

from datetime import datetime, timedelta


def next_attempt_at(retry_delay: int, retries: int, failed_at: datetime) -> datetime:
    """When the retry after ``retries`` earlier ones runs, the run having failed at ``failed_at``.

    Args:
        retry_delay: the task's ``retry_delay`` in seconds (0 to 86,400).
        retries: the retries the task made before this failure (0 to ``max_retries`` - 1).
        failed_at: when the run failed.
    """
    if retry_delay < 0 or retries < 0:
        raise ValueError("retry_delay and retries are at least 0")
    return failed_at + timedelta(seconds=retry_delay * 2**retries)
