"""The advisory lock keys of kaiju-tasks: the managers' leadership locks.

``leadership.py`` takes them; the read side (``insights.py``) sees whether a manager holds one.
"""

from __future__ import annotations

LEADER_LOCK_KEY = 0x6B61696A7500  # arbitrary, fixed: the manager leadership advisory lock
GC_LOCK_KEY = LEADER_LOCK_KEY + 1
"""Leadership of managers that only collect garbage (``--disable-scheduler``), so that they
do not stand by behind a scheduling leader."""


def halves(key: int) -> tuple[int, int]:
    """``(classid, objid)``: how ``pg_locks`` shows a lock taken on the bigint ``key``."""
    return key >> 32, key & 0xFFFFFFFF
